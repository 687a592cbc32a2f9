"""Linear attention with a feature map, the engine of every random-feature method (Performer, SRF, ScatterBrain's
low-rank part), written once.

With features phi(q_i), phi(k_j) in R^m (``common.random_features``) the kernel exp(S q.k) is estimated by
phi(q).phi(k), and attention becomes linear attention (Katharopoulos et al. 2020, eq. 4-6; Choromanski et al. 2021,
"Rethinking Attention with Performers", Sec. 2, FAVOR+ attention):

    non-causal:  o_i = phi(q_i)^T (S_0 + sum_j phi(k_j) v_j^T),
    causal:      the same with the sum over j <= p_i only (prefix sums, Performer's unidirectional case),

with S_0 an optional ``initial_state`` (B, H, m, Dv), the sum over earlier positions that recurrent decoding
carries. The functions here return that *unnormalised* sum, as flash-linear-attention's ``chunk_linear_attn`` with
``normalize=False`` does; the softmax normaliser phi(q_i)^T sum_j phi(k_j) is the same sum with values 1, so a
caller appends a column of ones to V (:func:`augment_values`) and divides at the end (:func:`split_augmented`).

Causal follows the repository's convention (``common.causal_query_positions``): query i is at position
p_i = i + Nk - Nq and reads keys j <= p_i; with Nq < Nk the first Nk - Nq keys are read by every query.

Two forms compute the same thing, and the tests check one against the other:
- :func:`linear_attention`: the reference, the masked quadratic form (phi(Q) phi(K)^T * M) V, O(Nq Nk) memory.
- :func:`chunk_linear_attention`: the chunkwise form used by the methods. Inside a chunk of C positions the masked
  C x C product, across chunks one (m x Dv) state per chunk (a cumulative sum over chunks), so memory is
  O(L m + L C + (L / C) m Dv), never an L x m x Dv cumulative tensor. Non-causal it is one (m x Dv) product.

Both take ``initial_state`` and return ``(o, final_state)``, ``final_state`` = S_0 + sum over every key
(B, H, m, Dv), or None unless ``output_final_state`` (the argument names of flash-linear-attention).

Numerics (half precision): features and values may be bfloat16 / float16. The products of one chunk (phi(Q_c)
phi(K_c)^T, its product with V_c, phi(K_c)^T V_c) run in the input dtype, as a GPU's tensor cores do (they
accumulate each product in float32); the states, which sum over the whole sequence, are accumulated (cumulative sum
over chunks) in float32, and cast to the input dtype only for the product with the queries, as
flash-linear-attention's chunk kernels do; the output and the final state are returned in float32 (float64 for
float64 inputs), so that a caller divides numerator by normaliser in float32.

Backends. :func:`chunk_linear_attention` (PyTorch) is the reference for everything else and the CPU path. On a CUDA
GPU the causal form can instead run in flash-linear-attention's fused Triton kernels (package ``fla-core``, MIT
licence; Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient Training",
ICML 2024, Sec. 3: the chunkwise form above with the per-chunk states computed in one pass and kept in on-chip
memory): :func:`fla_chunk_linear_attention` has the arguments and result of :func:`chunk_linear_attention`, imports
``fla`` only when called, and is optional: ``backend='auto'`` (:func:`resolve_backend`) takes it for causal
bfloat16 features on CUDA when ``fla`` is importable, and the PyTorch form everywhere else, so a CPU user never
needs it. Its normaliser is not fla's (which adds 1e-10 to every denominator and rounds it to the input dtype):
:func:`normaliser` computes phi(q_i)^T (z_0 + sum_{j <= p_i} phi(k_j)) as a cumulative sum in float32.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .attention import causal_mask


def augment_values(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: values with a column of ones, so that one linear attention yields numerator and denominator."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def split_augmented(out: torch.Tensor) -> torch.Tensor:
    """Numerator / denominator of an augmented output (..., Dv + 1) -> (..., Dv).

    The denominator is a sum of positive terms; it can only be zero when every term underflowed (features of
    very large inputs), and then the numerator is zero too: the floor keeps the result finite (zero) there.
    """
    return normalise(out[..., :-1], out[..., -1:])


def normalise(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator with the denominator floored at the smallest normal number of its dtype."""
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)


def _check(name, q, k, v, causal, initial_state):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[-1] != k.shape[-1] or k.shape[2] != v.shape[2] \
            or q.shape[:2] != k.shape[:2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{name}: expected features q (B, H, Nq, m), k (B, H, Nk, m) and values v (B, H, Nk, Dv), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"{name}: causal needs Nq <= Nk (queries are the last Nq positions), got Nq={q.shape[2]}, "
                         f"Nk={k.shape[2]}")
    expected = (*k.shape[:2], k.shape[-1], v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"{name}: initial_state must have shape (B, H, m, Dv) = {expected}, "
                         f"got {tuple(initial_state.shape)}")


def _accumulation(t: torch.Tensor) -> torch.dtype:
    """float32 for half precision (and float32) inputs, float64 for float64: where sums are accumulated."""
    return torch.promote_types(t.dtype, torch.float32)


def _final_state(k, v, initial_state, output_final_state):
    if not output_final_state:
        return None
    state = (k.transpose(-2, -1) @ v).to(_accumulation(v))
    return state if initial_state is None else state + initial_state.to(state.dtype)


def chunk_states(k_chunks: torch.Tensor, v_chunks: torch.Tensor, initial_state: torch.Tensor | None = None,
                 reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The state each chunk starts from: S_0 + sum over the chunks before it of phi(K_c)^T V_c (after it, with
    ``reverse``), shape (B, H, n, m, e); and the state after every chunk, S_0 + the sum over all (B, H, m, e).

    k_chunks: (B, H, n, C, m), v_chunks: (B, H, n, C, e). An exclusive cumulative sum over chunks: no state is
    obtained by subtracting one sum from another, so nothing cancels.
    """
    chunk_kv = (k_chunks.transpose(-2, -1) @ v_chunks).to(_accumulation(v_chunks))  # (B, H, n, m, e): one chunk's sum
    if reverse:
        chunk_kv = chunk_kv.flip(2)
    inclusive = chunk_kv.cumsum(dim=2)                              # sums up to the end of each chunk
    before = torch.cat([torch.zeros_like(chunk_kv[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    final = inclusive[:, :, -1]
    if initial_state is not None:
        before = before + initial_state.to(before.dtype).unsqueeze(2)
        final = final + initial_state.to(final.dtype)
    return (before.flip(2) if reverse else before), final


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference form: o = (phi(Q) phi(K)^T * M) V + phi(Q) S_0, with M the causal mask (all ones if not causal).

    q: (B, H, Nq, m) query features, k: (B, H, Nk, m) key features, v: (B, H, Nk, Dv); causal needs Nq <= Nk.
    Returns (o (B, H, Nq, Dv), final_state (B, H, m, Dv) or None), in float32 for half precision inputs (the
    reference computes everything in that dtype).
    """
    _check("linear_attention", q, k, v, causal, initial_state)
    q, k, v = (t.to(_accumulation(v)) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1)
    if causal:
        scores = scores * causal_mask(q.shape[2], k.shape[2], q.device)
    out = scores @ v
    if initial_state is not None:
        out = out + q @ initial_state.to(out.dtype)
    return out, _final_state(k, v, initial_state, output_final_state)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise form of :func:`linear_attention` (same arguments and result, to float rounding).

    Causal with Nq < Nk: the first Nk - Nq keys are read by every query, so they are folded into the state first.
    """
    _check("chunk_linear_attention", q, k, v, causal, initial_state)
    if not causal:
        state = _final_state(k, v, initial_state, True)
        return (q @ state.to(q.dtype)).to(state.dtype), state if output_final_state else None
    b, h, length, m = q.shape
    past = k.shape[2] - length
    state = initial_state
    if past:
        state = _final_state(k[:, :, :past], v[:, :, :past], initial_state, True)
        k, v = k[:, :, past:], v[:, :, past:]
    e = v.shape[-1]
    if length == 0:
        return v.new_zeros(b, h, 0, e, dtype=_accumulation(v)), _final_state(k, v, state, output_final_state)
    chunk_size = min(chunk_size, length)  # a short input (one generated token) is one chunk, not padded
    pad = (-length) % chunk_size
    if pad:  # zero keys add nothing to the sums; the padded queries are dropped below
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (length + pad) // chunk_size
    qc, kc = q.reshape(b, h, n, chunk_size, m), k.reshape(b, h, n, chunk_size, m)
    vc = v.reshape(b, h, n, chunk_size, e)

    before, final = chunk_states(kc, vc, state)
    inter = qc @ before.to(qc.dtype)                                # keys of earlier chunks (and the state)
    within = causal_mask(chunk_size, chunk_size, q.device)          # keys j <= i inside the chunk
    intra = ((qc @ kc.transpose(-2, -1)) * within) @ vc
    out = (inter.to(before.dtype) + intra.to(before.dtype)).reshape(b, h, n * chunk_size, e)[:, :, :length]
    return out, final if output_final_state else None


def prefix_sums(x: torch.Tensor, dtype: torch.dtype, chunk_size: int = 64) -> torch.Tensor:
    """Inclusive cumulative sum of x (B, H, N, m) over positions, accumulated in ``dtype``: ``x.cumsum(2, dtype)``
    to rounding, computed in two levels, within chunks of ``chunk_size`` positions and then over the chunk totals
    (an exclusive sum added to each chunk, nothing subtracted). On a GPU, torch's cumsum along a dimension that is
    not the innermost one scans each column serially (measured: 49 ms for N = 131,072, B H m = 512, on an H100);
    here the long scan is over N / C chunk totals laid out innermost, and the scans within chunks are C long.
    """
    b, h, n, m = x.shape
    if n <= chunk_size:
        return x.cumsum(2, dtype=dtype)
    pad = (-n) % chunk_size
    if pad:  # zero rows after the last position change no sum before them
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    within = x.reshape(b, h, -1, chunk_size, m).cumsum(3, dtype=dtype)
    inclusive = within[:, :, :, -1].transpose(-2, -1).cumsum(-1).transpose(-2, -1)   # over chunks: (B, H, n/C, m)
    before = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    return (within + before.unsqueeze(3)).view(b, h, -1, m)[:, :, :n]


def normaliser(q: torch.Tensor, k: torch.Tensor, causal: bool = False, initial_state: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The softmax normaliser of linear attention: phi(q_i)^T (z_0 + sum_{j <= p_i} phi(k_j)), (B, H, Nq, 1).

    It is :func:`linear_attention` with values 1 (the last column of :func:`augment_values`), written as a
    cumulative sum over keys (the sum over all keys if not causal) accumulated in float32 (float64 for float64
    features) and multiplied by the query features in that dtype. ``initial_state`` z_0 (B, H, m) is the key sum of
    earlier positions. Used with :func:`fla_chunk_linear_attention`, whose kernels return the numerator only.
    """
    acc = _accumulation(k)
    _check("normaliser", q, k, k[..., :1], causal, None if initial_state is None else initial_state.unsqueeze(-1))
    if causal:
        z = prefix_sums(k, acc)[:, :, k.shape[2] - q.shape[2]:]              # (B, H, Nq, m): keys j <= p_i
    else:
        z = k.sum(2, keepdim=True, dtype=acc)
    if initial_state is not None:
        z = z + initial_state.to(acc).unsqueeze(2)
    return (z * q).sum(-1, keepdim=True)


BACKENDS = ("auto", "torch", "fla")


def fla_available() -> bool:
    """Whether flash-linear-attention (``pip install fla-core``) and Triton are installed and fla's kernels import."""
    return _fla_import_error() is None


@functools.cache
def _fla_import_error() -> str | None:
    """None when fla's linear-attention kernels import (their autotuning then limited), else why not; tried once."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("fla") is None:
        return "not installed"
    try:
        _fla_kernel()
    except Exception as error:  # noqa: BLE001  (an optional package that fails to import is not available)
        return f"installed, but importing it failed ({type(error).__name__}: {error})"
    return None


def _check_fla(name: str, q: torch.Tensor, argument: str = "backend") -> None:
    if not fla_available():
        raise RuntimeError(f"{name}: {argument}='fla' needs flash-linear-attention and Triton (pip install fla-core): "
                           f"{_fla_import_error() or 'not installed'}; use {argument}='torch'")
    if q.device.type != "cuda":
        raise RuntimeError(f"{name}: {argument}='fla' runs Triton kernels on CUDA devices, got tensors on {q.device}; "
                           f"use {argument}='torch'")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: {argument}='fla' takes float32, bfloat16 or float16 features, got {q.dtype}; "
                         f"use {argument}='torch'")


# 'auto' takes fla only up to this many features: the size its kernels were verified at on the H100 (m = 64, issue
# 13's runs); in the 13:58 UTC run of 2026-11-25 the default budgets (m = 256 to 1,448, causal bfloat16) failed to
# compile a Triton kernel (m = 256) or ran their first call past 15 s (m = 362, 724). 'fla' asked explicitly still
# tries any size.
FLA_AUTO_MAX_FEATURES = 64


def auto_takes_fla(causal: bool, device_type: str, dtype: torch.dtype, n_features: int) -> bool:
    """Whether ``backend='auto'`` would pick fla (if installed): causal, CUDA, bfloat16, at most
    :data:`FLA_AUTO_MAX_FEATURES` features."""
    return causal and device_type == "cuda" and dtype == torch.bfloat16 and n_features <= FLA_AUTO_MAX_FEATURES


def resolve_backend(backend: str, q: torch.Tensor, causal: bool, name: str = "linear_attention",
                    argument: str = "backend", n_features: int | None = None) -> str:
    """'torch' or 'fla' for ``backend`` in :data:`BACKENDS` and query features ``q``.

    ``n_features`` is the number of features 'auto' compares with :data:`FLA_AUTO_MAX_FEATURES`: by default
    ``q.shape[-1]`` (``q`` holds the features); a caller that resolves before its feature map (``q`` the raw
    queries, whose last dimension is the head size) must pass its feature count.

    'auto' is 'fla' for causal bfloat16 features (at most :data:`FLA_AUTO_MAX_FEATURES`) on a CUDA device when
    ``fla`` is importable, else 'torch': the
    non-causal form is two matrix products, which PyTorch already runs at the GPU's speed; float32 features stay on
    PyTorch because fla's kernels multiply float32 in TF32 (10-bit mantissa), PyTorch's by default in full float32.
    'fla' asked for where it cannot run raises, naming 'torch'; ``name`` and ``argument`` name the caller and its
    option in the messages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{name}: {argument} must be one of {BACKENDS}, got {backend!r}")
    if backend == "fla":
        _check_fla(name, q, argument)
        return "fla"
    m = q.shape[-1] if n_features is None else n_features
    if backend == "auto" and auto_takes_fla(causal, q.device.type, q.dtype, m) and fla_available():
        return "fla"
    return "torch"


# fla autotunes each of its two state kernels over 48 configurations (tile sizes x 4 warp counts x 3 pipeline
# depths) for every new shape and dtype, and a causal forward + backward runs them three times (the backward
# recomputes the states in float32): minutes of compilation on the first call. We keep its four tilings at the
# warp counts and depths below, process-wide, the first time this module calls fla.
FLA_STATE_KERNEL_WARPS = (4,)
FLA_STATE_KERNEL_STAGES = (2, 3)


def limit_fla_autotuning() -> None:
    """Restrict the autotuning of fla's state kernels (``fla.ops.common.chunk_h``) to the configurations with
    :data:`FLA_STATE_KERNEL_WARPS` warps and :data:`FLA_STATE_KERNEL_STAGES` stages; other kernels are left alone."""
    from fla.ops.common import chunk_h

    for kernel in fla_state_kernels(chunk_h):
        kept = [c for c in kernel.configs
                if c.num_warps in FLA_STATE_KERNEL_WARPS and c.num_stages in FLA_STATE_KERNEL_STAGES]
        kernel.configs = kept or kernel.configs


def fla_state_kernels(chunk_h) -> list:
    """The autotuners of fla's two state kernels (under their ``triton.heuristics`` wrappers)."""
    from triton.runtime.autotuner import Autotuner

    found = []
    for kernel in (chunk_h.chunk_fwd_kernel_h, chunk_h.chunk_bwd_kernel_dh):
        while not isinstance(kernel, Autotuner) and hasattr(kernel, "fn"):
            kernel = kernel.fn
        if isinstance(kernel, Autotuner):
            found.append(kernel)
    return found


@functools.cache
def _fla_kernel():
    limit_fla_autotuning()
    from fla.ops.linear_attn import chunk_linear_attn
    return chunk_linear_attn


def fla_chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_linear_attention` (same arguments and result, to float rounding) with the causal part computed by
    flash-linear-attention's ``chunk_linear_attn`` (``normalize=False``, ``scale=1``: our features carry the scale),
    forward and backward (its own autograd function, gradients for q, k, v and ``initial_state``).

    Layout: our (B, H, N, m) tensors are passed as fla's (B, T, H, K) = (B * H, N, 1, m), a view, so nothing is
    transposed. Causal with Nq < Nk: the first Nk - Nq keys are folded into the initial state first (in PyTorch), as
    :func:`chunk_linear_attention` does. Not causal: the PyTorch form (fla has no non-causal kernel; it is two
    matrix products). fla's half-precision backward needs an even m and Dv: an odd one gets a zero column, which
    changes no sum. Numerics: products of bfloat16 / float16 features in fp32 accumulators, the running state in
    float32 inside the kernel and stored per chunk in the input dtype, the output rounded to the input dtype by fla
    and returned in float32; float32 features are multiplied in TF32 (Triton's default). CUDA only.
    """
    _check("fla_chunk_linear_attention", q, k, v, causal, initial_state)
    _check_fla("fla_chunk_linear_attention", q)
    if not causal or q.shape[2] == 0:
        return chunk_linear_attention(q, k, v, causal, initial_state=initial_state,
                                      output_final_state=output_final_state)
    b, h, length, m = q.shape
    e = v.shape[-1]
    past = k.shape[2] - length
    state = initial_state
    if past:
        state = _final_state(k[:, :, :past], v[:, :, :past], initial_state, True)
        k, v = k[:, :, past:], v[:, :, past:]
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    pad_m, pad_e = m % 2, e % 2
    q, k = (torch.nn.functional.pad(t.to(dtype), (0, pad_m)) for t in (q, k))
    v = torch.nn.functional.pad(v.to(dtype), (0, pad_e))
    if state is not None:
        state = torch.nn.functional.pad(state.float(), (0, pad_e, 0, pad_m)).reshape(b * h, 1, m + pad_m, e + pad_e)
    out, final = _fla_kernel()(*(t.reshape(b * h, length, 1, t.shape[-1]) for t in (q, k, v)), scale=1.0,
                               initial_state=state, output_final_state=output_final_state, normalize=False)
    out = out.reshape(b, h, length, e + pad_e)[..., :e].to(_accumulation(v))
    if output_final_state:
        final = final.reshape(b, h, m + pad_m, e + pad_e)[:, :, :m, :e].to(_accumulation(v))
    return out, final
