"""FastAttention: softmax attention estimated with positive random features (FAVOR+), simplex-coupled by default.

Reid, Choromanski, Likhosherstov, Weller, "Simplex Random Features" (ICML 2023) replace the orthogonal random
features of FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021) by simplex random
features (SimRFs, their Sec. 3): the same unbiased estimator of the softmax kernel (their eq. 1 with the positive
random features of Performer's Lemma 1)

    exp(S q.k) = E[phi(q) . phi(k)],   phi(x) = exp(W x' - |x'|^2/2) / sqrt(m),   x' = sqrt(S) x,

with lower variance (their Sec. 3: the lowest MSE among weight-independent couplings). Attention is then linear
attention (``common.linear_attention``); features and projections come from ``common.random_features``.

Three ways of running it, as the package README promises:

- ``mode='train'``: the whole sequence at once, causal (chunked prefix sums) or not; autograd works through it.
  The linear-attention core (``attn_fn``): ``'torch'``, plain PyTorch (``common.linear_attention``, the reference
  and the CPU path); ``'fla'``, flash-linear-attention's fused Triton chunk kernels behind the same interface
  (``common.linear_attention.fla_chunk_linear_attention``, optional, CUDA); ``'auto'`` (default), ``'fla'`` for causal
  bfloat16 on CUDA when it is installed and m <= 64 (``FLA_AUTO_MAX_FEATURES``), else ``'torch'``; ``'flash'``, our own Triton kernel
  (``flash_linear_attention.py``). The feature map (``feature_kernel``): ``'auto'`` (default: the fused kernel
  on CUDA where it fits, else PyTorch), ``'torch'`` (``common.random_features``) or ``'triton'``
  (``triton_features.py``: one fused kernel, CUDA). Those that cannot run where asked refuse clearly, naming ``'torch'``.
- ``mode='prefill'``: a causal prompt, returning ``(o, kv, key_maxima, denominator)``, the state for generation.
  ``attn_fn='parallel'`` (chunked prefix sums over the whole prompt), ``'chunkwise-recurrent'`` (one chunk at a
  time, carrying the state) and ``'recurrent'`` (one token at a time) give the same result to float tolerance.
- ``mode='generation'``: new tokens read the state and update it: O(m * Dv) memory, whatever the context length.

The state. kv = sum_j phi~(k_j) v_j^T (m, Dv) and denominator = sum_j phi~(k_j) (m,), where phi~(k) =
phi(k) exp(-key_maxima) is the key feature stabilised by the largest key logit seen so far
(``common.random_features.positive_random_features``).
A new key with a larger logit raises key_maxima; the state is then multiplied by exp(old - new) <= 1, so no term
ever overflows, and the factor cancels between numerator and denominator exactly as in the parallel form.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.attention import AttentionMethod, causal_mask
from common.registry import register
from common.validation import check_choice, check_finite_result, check_int, check_qkv, resolve_scale

from common.linear_attention import (augment_values, chunk_linear_attention, fla_chunk_linear_attention, normalise,
                                     normaliser, resolve_backend, split_augmented)
from common.random_features import FEATURE_TYPES, NORMS, positive_random_features, random_matrix

from .flash_linear_attention import check_available as check_flash_available, flash_linear_attention
from .triton_features import AUTO_MAX_FEATURES, fused_features_available, fused_positive_random_features

MODES = ("train", "prefill", "generation")
ATTN_FNS = {"train": ("auto", "torch", "fla", "flash"), "prefill": ("parallel", "chunkwise-recurrent", "recurrent"),
            "generation": ("recurrent",)}
FEATURE_KERNELS = ("auto", "torch", "triton")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs: exp and the long sums need its precision (bfloat16 has 8 bits)."""
    return torch.promote_types(dtype, torch.float32)


class FastAttention(nn.Module):
    """Random-feature attention of one head dimension with a fixed (redrawable) projection W (m, head_dim).

    Args:
        head_dim: D, the size of queries and keys.
        nb_features: m, the number of random features (default: head_dim, one simplex block).
        causal: whether query i reads only keys j <= i (needed by prefill and generation).
        feature_type: 'simplex' (SimRF), 'orthogonal' (ORF, Performer) or 'iid' (``common.random_features``).
        norm: 'chi' (unbiased) or 'fixed' row norms (``common.random_features``).
        chunk_size: C of the chunked prefix sums and of chunkwise-recurrent prefill.
        seed: seeds the generator that draws W (and every redraw), so that a run repeats exactly.
        feature_kernel: 'auto' (the fused kernel of ``triton_features.py`` where it runs and m <= AUTO_MAX_FEATURES,
            the size verified on the H100: CUDA with Triton; else PyTorch), 'torch' (``common.random_features``) or 'triton' (the fused kernel, refused elsewhere).
    """

    def __init__(self, head_dim: int, nb_features: int | None = None, causal: bool = False,
                 feature_type: str = "simplex", norm: str = "chi", chunk_size: int = 64, seed: int | None = None,
                 feature_kernel: str = "auto"):
        super().__init__()
        self.head_dim = check_int(head_dim, "head_dim", "FastAttention", minimum=1)
        self.nb_features = check_int(head_dim if nb_features is None else nb_features, "nb_features",
                                     "FastAttention", minimum=1)
        self.causal = bool(causal)
        self.feature_type = check_choice(feature_type, "feature_type", "FastAttention", FEATURE_TYPES)
        self.norm = check_choice(norm, "norm", "FastAttention", NORMS)
        self.chunk_size = check_int(chunk_size, "chunk_size", "FastAttention", minimum=1)
        self.feature_kernel = check_choice(feature_kernel, "feature_kernel", "FastAttention", FEATURE_KERNELS)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self.redraw_on_call = False
        # Persistent: a checkpoint must carry the features its generation state was built with.
        self.register_buffer("projection", self._draw())

    def _draw(self) -> torch.Tensor:
        return random_matrix(self.feature_type, self.nb_features, self.head_dim, generator=self._generator,
                             norm=self.norm)

    def redraw_(self) -> "FastAttention":
        """Draw a new projection W in place (Performer's feature redrawing, Choromanski et al. 2021)."""
        self.projection.copy_(self._draw())
        return self

    def redraw_on_call_(self, flag: bool) -> "FastAttention":
        """Redraw W at every ``mode='train'`` call made in training mode (``module.train()``); prefill and
        generation never redraw, since their state belongs to the features it was built with."""
        self.redraw_on_call = bool(flag)
        return self

    # --- features -------------------------------------------------------------------------------------
    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the feature map runs in the fused Triton kernel; 'triton' where it cannot run raises."""
        if self.feature_kernel == "triton" and not fused_features_available(x, self.projection):
            raise RuntimeError(f"FastAttention: feature_kernel='triton' is a Triton kernel for CUDA tensors of float32, "
                               f"bfloat16 or float16 (got {x.dtype} on {x.device}); use feature_kernel='torch'")
        return self.feature_kernel == "triton" or (self.feature_kernel == "auto"
                                                   and self.projection.shape[0] <= AUTO_MAX_FEATURES
                                                   and fused_features_available(x, self.projection))

    def _features(self, x: torch.Tensor, scale: float, offset) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fused(x):
            return fused_positive_random_features(x, self.projection, scale, offset)
        return positive_random_features(x, self.projection, scale, offset)

    def query_features(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """phi(q) with each query's own maximum removed (it cancels in that query's ratio)."""
        return self._features(q, scale, "row")[0]

    def key_features(self, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi(k) exp(-c), c) with c the largest key logit of each (batch, head), shape (B, H, 1, 1)."""
        return self._features(k, scale, "global")

    # --- mode='train' --------------------------------------------------------------------------------
    def linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         scale: float, attn_fn: str = "auto", return_lse: bool = False):
        """The whole sequence at once (Performer Sec. 2: FAVOR+ attention; causal by prefix sums), in PyTorch
        (``attn_fn='torch'``), flash-linear-attention's kernels (``'fla'``; ``'auto'`` picks, see the module
        docstring) or our Triton kernel (``'flash'``, ``flash_linear_attention.py``).

        With causal and Nq < Nk the queries are the last Nq positions: the first Nk - Nq keys form the state.

        bfloat16 is not upcast as a whole: the feature logits, their max-subtraction and exp run in float32 and the
        features are stored in bfloat16 (``positive_random_features``; bfloat16 has float32's exponent range, so
        small key features survive); the chunk products run in bfloat16; the running states (sums over the
        sequence) and the final numerator / normaliser division are float32 (``common.linear_attention``).
        float16 is computed in float32: stored in float16, features below its smallest normal (6e-5) of the largest
        one would vanish, and with them whole rows (measured: rms error 0.7 on one key at scores 1e4). The output
        has the input dtype. ``return_lse=True`` returns (out, lse) with lse (B, H, Nq) the log of the estimated
        normaliser (float32, float64 for float64 inputs).

        With ``'fla'`` the numerator phi(Q) (prefix) sums of phi(K)^T V comes from fla's kernels (bfloat16 products,
        float32 states, see ``common.linear_attention.fla_chunk_linear_attention``) and the normaliser from
        ``common.linear_attention.normaliser`` (a float32 cumulative sum of the key features), and so does the
        non-causal PyTorch form (the numerator from ``chunk_linear_attention``); the causal PyTorch form and
        ``'flash'`` compute both at once on values augmented with a column of ones.
        """
        dtype = q.dtype
        if dtype == torch.float16:  # its range (smallest normal 6e-5) would flush most key features to zero
            q, k, v = (t.float() for t in (q, k, v))
        # every refusal before any redraw: a refused call changes nothing
        if attn_fn == "flash":
            check_flash_available(q.device)
            core = "flash"
        else:
            core = resolve_backend(attn_fn, q, causal, "FastAttention", "attn_fn", n_features=self.projection.shape[0])
        self._fused(q)
        if self.redraw_on_call and self.training:
            self.redraw_()
        qf, c_q = self._features(q, scale, "row")  # query_features, with the offsets kept for return_lse
        kf, c_k = self.key_features(k, scale)
        if core == "fla" or (core == "torch" and not causal):
            # numerator and float32 normaliser apart: fla's kernels give only the former; non-causal, this also
            # avoids a product with Dv + 1 = 65 columns, which tensor cores handle badly (an H100 at n = 131,072:
            # 2.35 ms this way, 5.5 ms on augmented values)
            core_fn = fla_chunk_linear_attention if core == "fla" else chunk_linear_attention
            num, den = core_fn(qf, kf, v, causal)[0], normaliser(qf, kf, causal)
        else:
            out = flash_linear_attention(qf, kf, augment_values(v), causal) if core == "flash" else \
                chunk_linear_attention(qf, kf, augment_values(v), causal, self.chunk_size)[0]
            num, den = out[..., :-1], out[..., -1:]
        if not return_lse:
            return normalise(num, den).to(dtype)
        # the log of the estimated normaliser e^{c_q + c_k} phi~(q_i).sum_j phi~(k_j) of sum_j e^{S q_i.k_j}
        # (unbiased: Performer's Lemma 1), float32 at least; -inf where every feature product underflowed
        acc = torch.promote_types(den.dtype, torch.float32)
        return normalise(num, den).to(dtype), den.squeeze(-1).to(acc).log() + (c_q + c_k).squeeze(-1).to(acc)

    # --- mode='prefill' and 'generation' ------------------------------------------------------------------
    def _advance(self, q, k, v, state, key_maxima, scale, chunk_size):
        """Attend new positions causally on top of ``state`` and fold them in; returns (out, state, key_maxima).

        The new keys' maximum logit c may exceed the carried one; both sides are brought to the larger one
        (multiplying by exp(old - new) <= 1), which leaves every numerator/denominator ratio unchanged.
        """
        kf, c = self.key_features(k, scale)
        if state is not None:
            new_maxima = torch.maximum(key_maxima, c)
            state = state * torch.exp(key_maxima - new_maxima)
            kf = kf * torch.exp(c - new_maxima)
            c = new_maxima
        out, state = chunk_linear_attention(self.query_features(q, scale), kf, augment_values(v), True, chunk_size,
                                            initial_state=state, output_final_state=True)
        return out, state, c

    def _run_blocks(self, q, k, v, state, key_maxima, scale, block: int):
        """Feed the sequence through :meth:`_advance` ``block`` positions at a time."""
        outs = []
        for start in range(0, q.shape[2], block):
            part = slice(start, start + block)
            out, state, key_maxima = self._advance(q[:, :, part], k[:, :, part], v[:, :, part], state, key_maxima,
                                                   scale, self.chunk_size)
            outs.append(out)
        return torch.cat(outs, dim=2), state, key_maxima

    def prefill(self, q, k, v, attn_fn: str = "parallel", scale: float | None = None):
        """Causal attention over a prompt; returns (o, kv (B,H,m,Dv), key_maxima (B,H), denominator (B,H,m))."""
        q, k, v, scale, dtype = self._check_recurrent_inputs(q, k, v, scale, "prefill")
        length = q.shape[2]
        block = {"parallel": length, "chunkwise-recurrent": self.chunk_size, "recurrent": 1}[attn_fn]
        out, state, key_maxima = self._run_blocks(q, k, v, None, None, scale, block)
        return self._outputs(out, state, key_maxima, dtype)

    def generate(self, q, k, v, kv=None, key_maxima=None, denominator=None, scale: float | None = None):
        """New positions (B, H, T, D) on top of a state (all None: an empty context); returns the new
        (o, kv, key_maxima, denominator). Memory O(m * Dv) per head however long the context is."""
        q, k, v, scale, dtype = self._check_recurrent_inputs(q, k, v, scale, "generation")
        state, key_maxima = self._check_state(kv, key_maxima, denominator, q, v)
        out, state, key_maxima = self._run_blocks(q, k, v, state, key_maxima, scale, self.chunk_size)
        return self._outputs(out, state, key_maxima, dtype)

    @staticmethod
    def _outputs(out, state, key_maxima, dtype):
        b, h = state.shape[:2]
        return split_augmented(out).to(dtype), state[..., :-1], key_maxima.view(b, h), state[..., -1]

    def _check_recurrent_inputs(self, q, k, v, scale, mode):
        if not self.causal:
            raise ValueError(f"FastAttention: mode={mode!r} is causal by nature; build it with causal=True")
        if not (q.shape[2] == k.shape[2] == v.shape[2]):
            raise ValueError(f"FastAttention: mode={mode!r} needs q, k, v of one length (the new positions), got "
                             f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
        work = _work_dtype(q.dtype)
        return q.to(work), k.to(work), v.to(work), resolve_scale(scale, self.head_dim), q.dtype

    def _check_state(self, kv, key_maxima, denominator, q, v):
        given = [t is not None for t in (kv, key_maxima, denominator)]
        if not any(given):
            return None, None
        if not all(given):
            raise ValueError("FastAttention: generation needs all of kv, key_maxima, denominator, or none of them "
                             "(an empty context)")
        b, h, dv, m = q.shape[0], q.shape[1], v.shape[-1], self.nb_features
        for name, t, shape in (("kv", kv, (b, h, m, dv)), ("key_maxima", key_maxima, (b, h)),
                               ("denominator", denominator, (b, h, m))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"FastAttention: state {name} must have shape {shape} (batch, heads, "
                                 f"nb_features={m}, value dim={dv}), got {got}: a state from another shape")
        work = _work_dtype(q.dtype)
        state = torch.cat([kv, denominator.unsqueeze(-1)], dim=-1).to(device=q.device, dtype=work)
        return state, key_maxima.to(device=q.device, dtype=work).view(b, h, 1, 1)

    # --- the module call ----------------------------------------------------------------------------------
    def forward(self, q, k, v, mode: str = "train", attn_fn: str | None = None, kv=None, key_maxima=None,
                denominator=None, scale: float | None = None):
        """q, k: (B, H, N, head_dim), v: (B, H, N, Dv).

        - mode='train', attn_fn 'auto' (default), 'torch', 'fla' or 'flash': returns o (B, H, Nq, Dv);
        - mode='prefill', attn_fn 'parallel' (default), 'chunkwise-recurrent' or 'recurrent': returns
          (o, kv, key_maxima, denominator);
        - mode='generation' (attn_fn 'recurrent'): q, k, v the new token(s), (kv, key_maxima, denominator) the
          state from prefill or the previous step; returns (o, kv, key_maxima, denominator).
        """
        check_choice(mode, "mode", "FastAttention", MODES)
        attn_fn = ATTN_FNS[mode][0] if attn_fn is None else attn_fn
        check_choice(attn_fn, f"attn_fn for mode={mode!r}", "FastAttention", ATTN_FNS[mode])
        check_qkv(q, k, v, causal=self.causal, scale=scale, method="FastAttention")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"FastAttention: q and k have head dim {q.shape[-1]}, but this module was built "
                             f"with head_dim={self.head_dim}")
        scale = resolve_scale(scale, self.head_dim)
        if mode == "prefill":
            return self.prefill(q, k, v, attn_fn, scale)
        if mode == "generation":
            return self.generate(q, k, v, kv, key_maxima, denominator, scale)
        return self.linear_attention(q, k, v, self.causal, scale, attn_fn)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, nb_features={self.nb_features}, causal={self.causal}, "
                f"feature_type={self.feature_type!r}, norm={self.norm!r}, chunk_size={self.chunk_size}, "
                f"feature_kernel={self.feature_kernel!r}")


class SRFState:
    """Constant-size decoding state of random-feature attention: kv (B,H,m,Dv), key_maxima (B,H),
    denominator (B,H,m), and how many positions it summarises. Empty (all None) until the first step."""

    def __init__(self):
        self.kv = self.key_maxima = self.denominator = None
        self.length = 0

    def __len__(self) -> int:
        return self.length


@register("srf")
class SRFAttention(AttentionMethod):
    """Simplex random feature attention (Reid et al. 2023) behind the repository's contract.

    Options: ``nb_features`` m (>= 1), ``chunk_size`` of the causal prefix sums, ``norm`` ('chi' | 'fixed'),
    ``redraw`` (new features at every call in training mode), ``attn_fn`` (the linear-attention core: 'auto',
    'torch', 'fla' or 'flash', see :class:`FastAttention`), ``feature_kernel`` ('auto', 'torch' or 'triton'),
    ``seed``. The projection is built at the first
    call, when the head dim is known; later calls must use the same head dim. Cost O(N m (D + Dv)).
    Incremental decoding keeps the O(m Dv) state :class:`SRFState` instead of a KV cache. ``exact_options`` is
    None (the base class's): no finite number of features makes the estimate exact; its error falls as 1/sqrt(m).
    """

    feature_type = "simplex"
    randomized = True
    supports_lse = True

    def __init__(self, nb_features: int = 64, chunk_size: int = 64, norm: str = "chi", redraw: bool = False,
                 attn_fn: str = "auto", feature_kernel: str = "auto", seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.nb_features = check_int(nb_features, "nb_features", self.name, minimum=1)
        self.chunk_size = check_int(chunk_size, "chunk_size", self.name, minimum=1)
        self.norm = check_choice(norm, "norm", self.name, NORMS)
        self.redraw = bool(redraw)
        self.attn_fn = check_choice(attn_fn, "attn_fn", self.name, ATTN_FNS["train"])
        self.feature_kernel = check_choice(feature_kernel, "feature_kernel", self.name, FEATURE_KERNELS)
        self.fast: FastAttention | None = None

    def _fast_for(self, head_dim: int, device) -> FastAttention:
        if self.fast is None:
            self.fast = FastAttention(head_dim, self.nb_features, causal=True, feature_type=self.feature_type,
                                      norm=self.norm, chunk_size=self.chunk_size, seed=self.seed,
                                      feature_kernel=self.feature_kernel).to(device)
            self.fast.redraw_on_call_(self.redraw)
            self.fast.train(self.training)
        elif self.fast.head_dim != head_dim:
            raise ValueError(f"{self.name}: built for head dim {self.fast.head_dim} at its first call, got "
                             f"head dim {head_dim}; use one module per head dim")
        return self.fast

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The projection is created lazily; a checkpoint that holds one creates it before it is loaded.
        key = prefix + "fast.projection"
        if self.fast is None and key in state_dict:
            self._fast_for(state_dict[key].shape[1], state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attend(self, q, k, v, causal, scale):
        return self._fast_for(q.shape[-1], q.device).linear_attention(q, k, v, causal, scale, self.attn_fn)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the estimated normaliser) for ``return_lse=True`` (``FastAttention.linear_attention``)."""
        return self._fast_for(q.shape[-1], q.device).linear_attention(q, k, v, causal, scale, self.attn_fn,
                                                                      return_lse=True)

    def attention_matrix(self, q, k, causal=False, scale=None):
        """The attention matrix the features imply: phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j') (B,H,Nq,Nk)."""
        scale = resolve_scale(scale, q.shape[-1])
        fast = self._fast_for(q.shape[-1], q.device)
        scores = fast.query_features(q, scale) @ fast.key_features(k, scale)[0].transpose(-2, -1)
        if causal:
            scores = scores * causal_mask(q.shape[2], k.shape[2], q.device)
        return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)

    def init_state(self) -> SRFState:
        return SRFState()

    def step(self, q, k, v, state: SRFState, scale=None):
        """Attend T >= 1 new positions on top of ``state`` and fold them into it (constant memory)."""
        if not isinstance(state, SRFState):
            raise TypeError(f"{self.name}: state must come from init_state() (an SRFState), got "
                            f"{type(state).__name__}")
        check_qkv(q, k, v, causal=True, scale=scale, method=self.name, check_finite=self.check_finite)
        fast = self._fast_for(q.shape[-1], q.device)
        out, state.kv, state.key_maxima, state.denominator = fast.generate(
            q, k, v, state.kv, state.key_maxima, state.denominator, resolve_scale(scale, q.shape[-1]))
        state.length += q.shape[2]
        return check_finite_result(out, self.name) if self.check_finite else out

    @classmethod
    def budgets(cls, n_keys):
        root = max(1, int(math.sqrt(n_keys)))
        return [{"nb_features": m} for m in (root, 2 * root, 4 * root)]
