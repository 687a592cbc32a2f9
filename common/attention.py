"""Exact softmax attention, the reference every method is compared against, and the base class of methods.

Softmax attention (Vaswani et al. 2017, eq. 1):

    A = softmax(S * Q K^T + M),   out = A V,

with S the scale (1/sqrt(D) by default) and M the mask (0 where allowed, -inf where not). With
``causal=True`` query i reads key j iff j <= i + (Nk - Nq) (see :mod:`common.validation`).

Two entries compute it:
- :func:`softmax_attention`: the explicit formula in plain PyTorch (scores, mask, softmax, product); any
  float dtype, float64 included. It is the reference of the tests.
- the registered method ``exact``: ``torch.nn.functional.scaled_dot_product_attention``, the fast path used
  as the baseline of benchmarks. The two agree to 1e-6 in float64 (tests/common/test_attention.py).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .partial_sums import PartialSums, from_logits
from .registry import register
from .validation import check_finite_result, check_masks, check_qkv, resolve_scale


def causal_query_positions(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """p_i = i + (Nk - Nq): the position of query i in the key sequence (the queries are the last Nq positions,
    "bottom-right" alignment); under ``causal=True`` query i reads exactly the keys j <= p_i."""
    return torch.arange(n_queries, device=device) + (n_keys - n_queries)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where query i may read key j, i.e. j <= p_i = i + (Nk - Nq)."""
    j = torch.arange(n_keys, device=device).unsqueeze(0)
    return j <= causal_query_positions(n_queries, n_keys, device).unsqueeze(1)


def allowed_key_counts(n_queries: int, n_keys: int, causal: bool, device=None) -> torch.Tensor:
    """|P_i|, the number of keys query i may read: Nk, or i + 1 + (Nk - Nq) under the causal convention."""
    if not causal:
        return torch.full((n_queries,), n_keys, device=device, dtype=torch.long)
    return causal_query_positions(n_queries, n_keys, device) + 1


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, H, N, D) picked by a long index (B, H, *S) -> (B, H, *S, D), e.g. sampled keys per query.

    Implemented as one ``index_select`` on the flattened (B*H*N, D) rows, which is several times faster on CPU
    than ``torch.gather`` with an index expanded over D.
    """
    b, h, n, d = x.shape
    if index.shape[:2] != (b, h):
        raise ValueError(f"gather_rows: index must start with the (B, H) = {(b, h)} of x, got {tuple(index.shape)}")
    offsets = (torch.arange(b * h, device=x.device) * n).view(b, h, *([1] * (index.dim() - 2)))
    return x.reshape(b * h * n, d).index_select(0, (index + offsets).reshape(-1)).view(*index.shape, d)


def attention_scores(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                     scale: float | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled, masked scores S * Q K^T + M of shape (B, H, Nq, Nk); masked entries are -inf. ``attn_mask`` as
    SDPA's: bool (True = may attend) or additive float, broadcastable to (B, H, Nq, Nk)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * resolve_scale(scale, q.shape[-1])
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    return scores


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """The attention matrix A = softmax(S * Q K^T + M) of shape (B, H, Nq, Nk); rows sum to one."""
    check_qkv(q, k, k[..., :1], causal=causal, scale=scale, method="attention_weights")
    return torch.softmax(attention_scores(q, k, causal, scale), dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      scale: float | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention softmax(S Q K^T + M) V computed with explicit scores (O(Nq Nk) memory); ``attn_mask``
    as SDPA's (a row with no allowed key gives nan here, as the plain formula does)."""
    check_qkv(q, k, v, causal=causal, scale=scale, method="softmax_attention")
    check_masks(q, k, attn_mask=attn_mask, method="softmax_attention")
    return torch.matmul(torch.softmax(attention_scores(q, k, causal, scale, attn_mask), dim=-1), v)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16 / float16 (docs/DESIGN.md, "Numerics and dtypes"), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
                       mask: torch.Tensor | None = None, chunk_elements: int = 1 << 24, min_chunk_keys: int = 256):
    """Exact (out, lse): softmax attention and its log-normaliser lse_i = log sum_j exp(S q_i.k_j + M_ij).

    Tiles of queries x keys of about ``chunk_elements`` scores (B H x query rows x keys; at least ``min_chunk_keys``
    keys a tile, fewer query rows when the batch is large) are formed one at a time, each tile's sums kept as
    :class:`~common.partial_sums.PartialSums` and merged along the keys (the online softmax of FlashAttention, Dao
    et al. 2022, Alg. 1), so no (Nq, Nk) float matrix is held at once; under ``causal`` the tiles wholly after a
    block's last query position are skipped. ``mask``: bool (True = may attend) or additive float, broadcastable to
    (B, H, Nq, Nk); ``causal`` adds the bottom-right causal mask. A row that reads no key gives out = 0 and
    lse = -inf (never nan). Sums are accumulated in :func:`accumulation_dtype`; out has q's dtype, lse the
    accumulation dtype (float32, or float64 for float64 inputs).
    """
    acc = accumulation_dtype(q.dtype)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    key_step = min(nk, max(min_chunk_keys, chunk_elements // max(1, b * h * nq)))
    query_step = max(1, chunk_elements // max(1, b * h * key_step))
    positions = causal_query_positions(nq, nk, q.device)
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    outs, lses = [], []
    for i0 in range(0, nq, query_step):
        i1 = min(nq, i0 + query_step)
        qa = q[:, :, i0:i1].to(acc)
        rows = positions[i0:i1].unsqueeze(1)
        sums = PartialSums.empty((b, h, i1 - i0), v.shape[-1], qa)
        for j0 in range(0, (i1 + nk - nq) if causal else nk, key_step):  # causal: keys up to the last position
            j1 = min(nk, j0 + key_step)
            logits = torch.matmul(qa, k[:, :, j0:j1].to(acc).transpose(-2, -1)) * scale
            if mask is not None:
                part = mask if mask.shape[-2] == 1 else mask[..., i0:i1, :]
                part = part if part.shape[-1] == 1 else part[..., j0:j1]
                logits = logits.masked_fill(~part, float("-inf")) if part.dtype == torch.bool \
                    else logits + part.to(acc)
            if causal:
                logits = logits.masked_fill(torch.arange(j0, j1, device=q.device) > rows, float("-inf"))
            sums = sums.merge(from_logits(logits, v[:, :, j0:j1].to(acc)))
        out, lse = output_and_lse(sums, q.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def output_and_lse(sums: PartialSums, dtype: torch.dtype):
    """(N / D in ``dtype``, lse = log D = shift + log den) of attention kept as sums: the hook through which a method
    whose estimate is a :class:`~common.partial_sums.PartialSums` answers ``return_lse=True``. A row with D = 0
    (no key read, or every term underflowed) gives out = 0 and lse = -inf, never nan."""
    empty = sums.den == 0
    den = sums.den.masked_fill(empty, 1.0)  # an empty row has num = 0: out 0, and no log(0) in the graph
    lse = torch.where(empty, torch.full_like(den, float("-inf")), sums.shift + den.log())
    return (sums.num / den.unsqueeze(-1)).to(dtype), lse


def key_padding_from_attn_mask(attn_mask: torch.Tensor, batch: int, n_queries: int, n_keys: int, causal: bool,
                               method: str) -> torch.Tensor:
    """The key-padding mask (B, Nk), True = padded, of an ``attn_mask`` that only pads keys; else a ValueError.

    Accepted: masks whose allowed keys are the same for every query row and head, or, with ``causal=True``, that
    pattern and-ed with the causal mask (what a decoder builds). A float mask counts as bool with its entries 0
    (allowed) or <= finfo.min (masked: -inf, or finfo.min as Hugging Face writes it); any other value is a general
    additive mask.
    """
    def refuse(why):
        return ValueError(f"{method}: attn_mask {why}; only exact honours a general attn_mask; {method} supports "
                          "key_padding_mask (bool (B, Nk), True = padded key), causal=True, and an attn_mask that "
                          "only pads keys (the same allowed keys for every query and head"
                          f"{', possibly and-ed with the causal mask' if causal else ''})")

    if attn_mask.is_floating_point():
        masked = attn_mask <= torch.finfo(attn_mask.dtype).min
        if not (masked | (attn_mask == 0)).all():
            raise refuse("has additive values other than 0 and -inf")
        allowed = ~masked
    else:
        allowed = attn_mask
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    allowed = allowed.expand(batch, allowed.shape[1], n_queries, n_keys)
    keys = allowed[:, :1, -1:, :]  # the last query reads every key under the causal convention too
    if not ((allowed == keys).all() or (causal and (allowed == (keys & causal_mask(n_queries, n_keys,
                                                                                  keys.device))).all())):
        raise refuse("is not a key-padding pattern")
    return ~keys[:, 0, 0, :]


class AttentionMethod(nn.Module):
    """Base of every registered method: ``out = method(q, k, v, causal=False, scale=None, enable_gqa=False,
    attn_mask=None, key_padding_mask=None, return_lse=False)`` (see :meth:`forward`).

    Subclasses implement :meth:`attend` and may set the class attributes below. ``forward`` validates the
    inputs once (shared messages, docs/DESIGN.md) and refuses what the method cannot honour; it answers an empty batch
    (B = 0 or H = 0) itself with an empty (B, H, Nq, Dv) tensor, as SDPA does, without calling ``attend``; and,
    when ``check_finite`` is on (the inputs were checked finite), it raises
    :class:`~common.validation.NonFiniteError` naming the method if ``attend`` returned a nan or inf.

    Class attributes:
        supports_causal: False -> ``causal=True`` raises a ValueError naming the method.
        trainable: False -> the method is inference-only and raises if its inputs require grad.
        randomized: True -> the method draws random numbers from ``self.generator`` (seeded by ``seed``).
        supports_lse: True -> the method implements :meth:`attend_lse` (``return_lse=True``); else it raises.
        supports_attn_mask: True -> :meth:`attend_masked` honours a general ``attn_mask`` (``exact``); else only
            a key-padding pattern is accepted (converted to ``key_padding_mask``) and other masks raise.
        exact_tolerance: relative Frobenius error vs exact attention that :meth:`exact_options` guarantees on
            float64 inputs (1e-6: exact up to rounding; a method whose exact options only approach exact raises it
            and says why in its docstring).
    """

    name = "attention"
    supports_causal = True
    trainable = True
    randomized = False
    supports_lse = False
    supports_attn_mask = False
    exact_tolerance = 1e-6

    def __init__(self, seed: int | None = None, check_finite: bool = True):
        super().__init__()
        self.seed = seed
        self.check_finite = check_finite
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device) -> torch.Generator:
        """The method's random stream on ``device``, seeded from ``seed`` (fresh entropy when seed is None).

        One generator per device, created on first use, so that a seeded method repeats exactly.
        """
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream(s) from ``seed``."""
        self.seed = seed
        self._generators.clear()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, return_lse: bool = False):
        """Attention of q (B, H, Nq, D) over k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv) (docs/DESIGN.md).

        ``enable_gqa=True``: grouped-query attention as SDPA defines it, k and v with Hkv heads where Hkv
        divides H; query head h reads key/value head h // (H / Hkv). Every method attends it by repeating the
        key/value heads (``repeat_interleave``, SDPA's own definition), so GQA equals the repeated heads exactly;
        masks apply after the repeat (they are broadcast over H query heads).

        ``key_padding_mask``: bool (B, Nk), True marks a PADDED key (the convention of
        ``torch.nn.MultiheadAttention``; the opposite of SDPA's bool ``attn_mask``). Every method honours it: per
        batch element the padded keys are dropped and the method runs on the real keys only (:meth:`attend_masked`),
        so a padded key never enters a normaliser, an index, a hash bucket or a sampled tail. With ``causal=True``
        the queries sit at the key positions p_i = i + (Nk - Nq) (bottom-right); a query whose own position is a
        padded key gets a zero output row; non-causal, every query reads the real keys (cross-attention too). A
        batch element with no real key gets zero output. When no key is padded the method runs once on the whole
        batch.

        ``attn_mask``: SDPA's, bool (True = may attend) or additive float of q's dtype, broadcastable to
        (B, H, Nq, Nk). ``exact`` honours any mask (a row with no allowed key gives 0); every other method accepts
        only a mask that pads keys (same allowed keys for every query and head, possibly and-ed with the causal
        mask when ``causal=True``), converted to ``key_padding_mask``, and refuses any other with a ValueError.

        Under a caller's ``torch.autocast`` the method still runs in the inputs' dtype (autocast is off inside).

        ``return_lse=True``: returns ``(out, lse)``, lse (B, H, Nq) = log sum_j exp(S q_i.k_j + M_ij) over the
        keys query i reads (the log-normaliser; the method's estimate of it for an approximation), float32 (float64
        for float64 inputs); lse = -inf for a row that reads no key (zero output row). Two results over disjoint
        key sets merge as out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2). Methods without
        ``supports_lse`` raise a ValueError naming the method.
        """
        check_qkv(q, k, v, causal=causal, scale=scale, method=self.name, check_finite=self.check_finite,
                  enable_gqa=enable_gqa)
        check_masks(q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, return_lse=return_lse,
                    method=self.name)
        if enable_gqa and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if causal and not self.supports_causal:
            raise ValueError(f"{self.name}: causal=True is not supported by this method")
        if return_lse and not self.supports_lse:
            raise ValueError(f"{self.name}: return_lse=True is not supported: this method forms no log-normaliser "
                             "(supports_lse is False)")
        if attn_mask is not None and not self.supports_attn_mask:
            padded = key_padding_from_attn_mask(attn_mask, q.shape[0], q.shape[2], k.shape[2], causal, self.name)
            key_padding_mask = padded if key_padding_mask is None else key_padding_mask | padded
            attn_mask = None
        if not self.trainable and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(f"{self.name} is inference-only (no gradient); call it under torch.no_grad() "
                               "or detach the inputs")
        if q.shape[0] == 0 or q.shape[1] == 0:
            # Empty batch or heads: nothing to attend, an empty (B, H, Nq, Dv) result as SDPA gives; written as
            # products of the empty inputs so that dtype, device and the autograd graph follow them.
            out = torch.matmul(torch.matmul(q, k.transpose(-2, -1)), v)
            return (out, q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype))) if return_lse else out
        scale = resolve_scale(scale, q.shape[-1])
        if key_padding_mask is not None and not key_padding_mask.any():
            key_padding_mask = None  # nothing padded: the fast path
        # A caller's autocast is off inside: a method computes in its inputs' dtype (accumulating in float32 where
        # its docstring says) and returns that dtype, whatever autocast would have made of its matmuls.
        with torch.autocast(q.device.type, enabled=False):
            if attn_mask is None and key_padding_mask is None:
                out, lse = self._attend_out_lse(q, k, v, causal, scale, return_lse)
            else:
                out, lse = self.attend_masked(q, k, v, causal, scale, attn_mask, key_padding_mask, return_lse)
        if self.check_finite:
            check_finite_result(out, self.name)
            if return_lse:  # -inf is the lse of a row that reads no key; nan or +inf is a failure
                check_finite_result(lse.masked_fill(lse == float("-inf"), 0.0), self.name, "lse")
        return (out, lse) if return_lse else out

    def _attend_out_lse(self, q, k, v, causal: bool, scale: float, return_lse: bool):
        """(out, lse) from :meth:`attend_lse`, or (out, None) from :meth:`attend`."""
        return self.attend_lse(q, k, v, causal, scale) if return_lse else (self.attend(q, k, v, causal, scale), None)

    def attend_masked(self, q, k, v, causal: bool, scale: float, attn_mask, key_padding_mask, return_lse: bool):
        """The generic key-padding path: per batch element, the method on its real keys only; (out, lse or None).

        ``attn_mask`` is None here (the base class converted a key-padding ``attn_mask``); a method that honours
        masks natively (``exact``) overrides this. Query i sits at key position p_i = i + (Nk - Nq) (bottom-right).
        First, for every batch element in turn, the queries at real positions are attended on the compacted real
        keys, exactly the call that the unpadded sequence run alone makes (same shapes, so a seeded method draws the
        same numbers, and a position-aware method sees the same positions). Under ``causal=True`` that is correct:
        the real queries are the real positions >= Nk - Nq, i.e. the last m of the R compacted keys, and the one at
        the t-th real key reads the real keys up to it, the first t compacted ones, exactly what bottom-right causal
        gives the compacted query at position t - 1 = (R - m) + its index among the m. A causal query at a padded
        position gets a zero row. Non-causal, every query reads all real keys (cross-attention included): the
        queries at padded positions (or before key 0) are attended afterwards, in a second pass over the batch.
        A batch element with no real key gives zero rows.
        """
        b, h, nq, _ = q.shape
        positions = causal_query_positions(nq, k.shape[2], q.device)
        at_real_key = (positions >= 0) & ~key_padding_mask[:, positions.clamp_min(0)]  # (B, Nq)
        outs = [q.new_zeros(1, h, nq, v.shape[-1]) for _ in range(b)]
        lses = [q.new_full((1, h, nq), float("-inf"), dtype=accumulation_dtype(q.dtype)) for _ in range(b)]
        for query_rows in ([at_real_key] if causal else [at_real_key, ~at_real_key]):
            for i in range(b):
                real = (~key_padding_mask[i]).nonzero().squeeze(1)
                rows = query_rows[i].nonzero().squeeze(1)
                if not (real.numel() and rows.numel()):
                    continue
                part, part_lse = self._attend_out_lse(
                    q[i:i + 1].index_select(2, rows), k[i:i + 1].index_select(2, real),
                    v[i:i + 1].index_select(2, real), causal, scale, return_lse)
                outs[i] = outs[i].index_copy(2, rows, part)
                if return_lse:
                    lses[i] = lses[i].index_copy(2, rows, part_lse.to(lses[i].dtype))
        return torch.cat(outs), (torch.cat(lses) if return_lse else None)

    def attend(self, q, k, v, causal: bool, scale: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def attend_lse(self, q, k, v, causal: bool, scale: float):  # pragma: no cover - abstract
        """(out, lse) for ``return_lse=True``, lse (B, H, Nq) the log-normaliser (estimate); methods with
        ``supports_lse = True`` implement it."""
        raise NotImplementedError

    # --- incremental decoding (docs/DESIGN.md: state is an explicit object) -------------------------------
    def init_state(self) -> "KVCache":
        """A fresh decoding state. The default keeps every key and value (a KV cache); methods with a
        constant-size state (SRF) override this and :meth:`step`."""
        return KVCache()

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: "KVCache",
             scale: float | None = None) -> torch.Tensor:
        """Append the new tokens' keys/values to ``state`` and attend the new queries causally.

        q, k, v: (B, H, T, D) for T >= 1 new positions. Equals the causal forward over the whole prefix
        at those positions.
        """
        state.append(k, v)
        return self(q, state.keys, state.values, causal=True, scale=scale)

    @classmethod
    def budgets(cls, n_keys: int) -> list[dict]:
        """Option sets of increasing work for comparisons at sequence length ``n_keys`` (common.compare)."""
        return [{}]

    @classmethod
    def exact_options(cls, n_keys: int) -> dict | None:
        """Options under which the method computes exact attention on ``n_keys`` keys (to ``exact_tolerance``),
        or None when no budget does (the default). The contract suite (tests/contract) checks them."""
        return None

    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options the constructor accepts (for the registry's validation)."""
        names = []
        for klass in cls.__mro__:
            if klass is nn.Module or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
        return names

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in self.option_names() if hasattr(self, n))


class KVCache:
    """Keys and values of the positions decoded so far, shape (B, H, T, D) each; grows by concatenation."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values = k, v
            return
        if k.shape[:2] != self.keys.shape[:2] or k.shape[-1] != self.keys.shape[-1] \
                or v.shape[-1] != self.values.shape[-1]:
            raise ValueError(f"KVCache: new keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the "
                             f"cached {tuple(self.keys.shape)} / {tuple(self.values.shape)} in batch, heads or dims")
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)


@register("exact")
class ExactAttention(AttentionMethod):
    """Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention`` (eq. 1).

    Honours any SDPA ``attn_mask`` and ``key_padding_mask`` natively, in one batched SDPA call with the combined
    mask (a row with no allowed key gives 0, where the plain formula gives nan); ``return_lse=True`` computes the
    output and the log-normaliser over key chunks (:func:`attention_with_lse`).
    """

    name = "exact"
    supports_lse = True
    supports_attn_mask = True
    # A key padding alone (no attn_mask) takes the base class's per-element path when the batched (B, Nq, Nk)
    # bool mask would exceed this many entries (64 MiB): SDPA then runs on the real keys with its fused kernels.
    native_mask_elements = 1 << 26

    @classmethod
    def exact_options(cls, n_keys):
        return {}

    def attend(self, q, k, v, causal, scale):
        nq, nk = q.shape[-2], k.shape[-2]
        if causal and nq != nk:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(nq, nk, q.device), scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def attend_lse(self, q, k, v, causal, scale):
        return attention_with_lse(q, k, v, scale, causal)

    def attend_masked(self, q, k, v, causal, scale, attn_mask, key_padding_mask, return_lse):
        """One SDPA call with causal, the key padding (same rule as the generic path: under causal a padded
        query's row is empty) and ``attn_mask`` folded into one mask; rows with no allowed key give 0. A key padding
        alone on a long batch (more than ``native_mask_elements`` mask entries) takes the generic path instead."""
        nq, nk = q.shape[2], k.shape[2]
        if attn_mask is None and q.shape[0] * nq * nk > self.native_mask_elements:
            return super().attend_masked(q, k, v, causal, scale, attn_mask, key_padding_mask, return_lse)
        allowed = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed & causal_mask(nq, nk, q.device)
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask[:, None, None, :]
            if causal:
                allowed = allowed & ~key_padding_mask[:, None, causal_query_positions(nq, nk, q.device), None]
        if attn_mask is None:
            mask = allowed
        elif attn_mask.dtype == torch.bool:
            mask = allowed & attn_mask
        else:
            mask = attn_mask.masked_fill(~allowed, float("-inf"))
        if return_lse:
            return attention_with_lse(q, k, v, scale, mask=mask)
        empty = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool \
            else (mask == float("-inf")).all(-1, keepdim=True)
        # An empty row is unmasked for SDPA (whose kernels may give nan for it) and its output set to 0.
        mask = mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.masked_fill(empty, 0.0), None
