"""Block-sparse attention over index lists: each tile of query rows attends to the keys its list names.

The computation (issue 13: the sampling methods' tiles, e.g. KDEformer's LSH blocks plus sampled keys, Zandieh et
al., ICML 2023, Alg. 2-3, and its causal diagonal chunks, HyperAttention, Han et al. 2023, Sec. 4). For each batch
element and head, tile t has M query rows (rows ``query_index[t, r]`` of q, or rows t M .. t M + M - 1 when no
query index is given) and an index list I_t of L key positions with log-weights w_t (0 when none are given). Query
row r of tile t gets

    out[t, r] = sum_{j visible} exp(S q_r . k_{I_tj} + w_tj) v_{I_tj} / sum_{j visible} exp(S q_r . k_{I_tj} + w_tj)

with S = ``scale``. Every column is visible without ``diagonal``; with ``diagonal=True`` the last M columns of each
list are the tile's own keys in the order of its query rows (a diagonal chunk) and row r sees column L - M + c only
for c <= r (block-causal), all earlier columns always. A log-weight of -inf excludes a column; exp(w) = 1 / (p m) is
an importance weight, so that the numerator and the denominator are each the estimator of their exact sums that the
caller built (KDEformer's residual samples). The output has shape (B, H, T, M, Dv) in the input dtype, rows in tile
order (the caller maps them back).

Two implementations of the same sums:

- ``kernel='torch'`` (:func:`reference_indexed_attention`, the CPU path and the test oracle): gathers each tile's
  queries, keys and values (``common.attention.gather_rows``) and makes one ``scaled_dot_product_attention`` call
  over all tiles. Without ``diagonal`` the log-weights are its additive mask (one row per tile, broadcast over the
  rows); with ``diagonal`` the weights ride on the values, [exp(w) v, exp(w)], so that the only mask is the one
  block-causal (M, L) pattern broadcast over tiles, and out = the first Dv columns / column Dv. Everything is
  materialised: 2 L (D + Dv) numbers per tile.
- ``kernel='triton'`` (:func:`triton_indexed_attention`, CUDA; CPU tensors under ``TRITON_INTERPRET=1``): a flash
  attention forward kernel that loads each block of BLOCK_N keys and values through the index list (no gathered
  copy; a column of log-weight -inf is not read), logits and the online softmax (running max, rescaled sums) in float32 (``tl.dot`` with float32
  accumulation; IEEE float32 products for float32 inputs), the log-weights added in float32, the output divided once
  at the end and rounded to the input dtype. Inputs bfloat16, float16 or float32; D and Dv in {16, 32, 64, 128}.
  Forward only (no autograd).

``kernel='auto'`` takes triton for CUDA tensors of a supported shape and dtype when triton imports and no gradient
is needed, torch otherwise. triton is imported lazily: a CPU user never needs it.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from common.attention import gather_rows

KERNELS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TRITON_DIMS = (16, 32, 64, 128)
BLOCK_N = 64  # keys per step of the kernel's loop (default)


def _check(q, k, v, key_index, log_weight, query_index, diagonal):
    """Shapes and dtypes of :func:`indexed_attention`'s arguments; (B, H, T, M, L) or a ValueError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("indexed_attention: q, k, v must be (B, H, N, D) tensors")
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"indexed_attention: k (B, H, Nk, D) and v (B, H, Nk, Dv) must match q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_index.dim() != 4 or key_index.shape[:2] != (b, h) or key_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indexed_attention: key_index must be an int32 / int64 (B, H, T, L) tensor with (B, H) = "
                         f"{(b, h)}, got {key_index.dtype} {tuple(key_index.shape)}")
    t, length = key_index.shape[2:]
    if query_index is None:
        if t == 0 or nq % t:
            raise ValueError(f"indexed_attention: without query_index the Nq = {nq} queries must split into the "
                             f"T = {t} tiles evenly")
        m = nq // t
    else:
        if query_index.dim() != 4 or query_index.shape[2] != t or query_index.dtype not in (torch.int32,
                                                                                             torch.int64):
            raise ValueError(f"indexed_attention: query_index must be an int32 / int64 (B|1, H|1, T, M) tensor with "
                             f"T = {t}, got {query_index.dtype} {tuple(query_index.shape)}")
        m = query_index.shape[3]
    if log_weight is not None and (log_weight.dim() != 4 or log_weight.shape[2:] != (t, length)
                                   or not log_weight.is_floating_point()):
        raise ValueError(f"indexed_attention: log_weight must be a floating (B|1, H|1, T, L) = (.., .., {t}, "
                         f"{length}) tensor, got {tuple(log_weight.shape)}")
    if diagonal and length < m:
        raise ValueError(f"indexed_attention: diagonal=True needs the tile's M = {m} own keys at the end of each "
                         f"list, got L = {length}")
    return b, h, t, m, length


def reference_indexed_attention(q, k, v, key_index, log_weight=None, query_index=None, diagonal=False,
                                scale=None):
    """The module docstring's sums by gathers and one fused SDPA call (``kernel='torch'``); (B, H, T, M, Dv).
    Log-weights and the weights exp(w) are rounded to the input dtype for the fused call (about 0.4% of a weight in
    bfloat16); with ``diagonal`` the ratio of the output's two parts is taken in float32 for half inputs."""
    b, h, t, m, length = _check(q, k, v, key_index, log_weight, query_index, diagonal)
    d, dv = q.shape[-1], v.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    flat = lambda x: x.reshape(b * h, t, *x.shape[3:])
    with record_function("indexed_attention.gather"):
        qt = q.view(b, h, t, m, d) if query_index is None else gather_rows(q, query_index.expand(b, h, t, m))
        kt = gather_rows(k, key_index)
        if not diagonal:
            vt = gather_rows(v, key_index)
            mask = None if log_weight is None else flat(log_weight.expand(b, h, t, length).unsqueeze(3).to(q.dtype))
        else:
            acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
            dv_pad = dv + 1 + (-(dv + 1) % 8)  # [w v, w, zeros]: a value width the fused kernels take without a copy
            v_one = torch.cat([v, torch.ones_like(v[..., :1]), v.new_zeros(b, h, v.shape[2], dv_pad - dv - 1)], -1)
            vt = gather_rows(v_one, key_index)
            if log_weight is not None:
                vt = vt * log_weight.expand(b, h, t, length).to(acc).exp().to(q.dtype).unsqueeze(-1)
            # row r reads every column up to L - M + r: one (M, L) mask for every tile, head and batch element
            mask = torch.zeros(m, length, dtype=q.dtype, device=q.device).masked_fill(
                torch.ones(m, length, dtype=torch.bool, device=q.device).triu(length - m + 1), float("-inf"))
    with record_function("indexed_attention.sdpa"):
        o = F.scaled_dot_product_attention(flat(qt), flat(kt), flat(vt), attn_mask=mask, scale=scale)
        if diagonal:
            o = (o[..., :dv].to(acc) / o[..., dv:dv + 1].to(acc)).to(q.dtype)
    return o.view(b, h, t, m, dv)


def triton_available() -> bool:
    """Whether triton imports (it is optional: the GPU image has it, a CPU install need not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports(q, k, v) -> str | None:
    """Why :func:`triton_indexed_attention` cannot take these inputs, or None when it can."""
    if not triton_available():
        return "triton is not importable"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the tensors are on {q.device} (CUDA, or CPU under TRITON_INTERPRET=1)"
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (supported: bfloat16, float16, float32, the same for q, k, v)"
    if q.shape[-1] not in TRITON_DIMS or v.shape[-1] not in TRITON_DIMS:
        return f"D = {q.shape[-1]}, Dv = {v.shape[-1]} (supported: {TRITON_DIMS})"
    return None


_KERNEL = None


def _kernel():
    """The @triton.jit kernel, built on first use (triton imported lazily)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def indexed_attention_kernel(Q, K, V, KI, QI, LW, O,
                                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                                 sib, sih, sit, sil, sjb, sjh, sjt, sjm, swb, swh, swt, swl,
                                 sob, soh, sot, som,
                                 H, M, L, scale_log2,
                                 HAS_QI: tl.constexpr, HAS_W: tl.constexpr, DIAGONAL: tl.constexpr,
                                 D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 PRECISION: tl.constexpr):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0).to(tl.int64)
        pid_bh = tl.program_id(1).to(tl.int64)
        n_row_blocks = tl.cdiv(M, BLOCK_M)
        t = pid_m // n_row_blocks
        m0 = (pid_m % n_row_blocks) * BLOCK_M
        bi = pid_bh // H
        hi = pid_bh % H
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if HAS_QI:
            qrow = tl.load(QI + bi * sjb + hi * sjh + t * sjt + rows * sjm, mask=row_ok, other=0).to(tl.int64)
        else:
            qrow = t * M + rows
        offs_d = tl.arange(0, D)
        offs_dv = tl.arange(0, DV)
        q = tl.load(Q + bi * sqb + hi * sqh + qrow[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        end = L
        if DIAGONAL:  # columns past the block's last row's own key are masked for every row of the block
            end = L - M + m0 + BLOCK_M
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            live = cols < L
            if HAS_W:  # a column of log-weight -inf is never read (its index, key and value loads are masked off)
                w = tl.load(LW + bi * swb + hi * swh + t * swt + cols * swl, mask=live, other=float("-inf"))
                w = w.to(tl.float32)
                live = live & (w > float("-inf"))
            idx = tl.load(KI + bi * sib + hi * sih + t * sit + cols * sil, mask=live, other=0).to(tl.int64)
            k = tl.load(K + bi * skb + hi * skh + idx[:, None] * skn + offs_d[None, :], mask=live[:, None],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # log2 units, float32
            if HAS_W:
                s = s + tl.where(live, w, 0.0)[None, :] * LOG2E
            visible = live[None, :] & (rows[:, None] >= 0)
            if DIAGONAL:
                visible = visible & (cols[None, :] - (L - M) <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(V + bi * svb + hi * svh + idx[:, None] * svn + offs_dv[None, :], mask=live[:, None],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + bi * sob + hi * soh + t * sot + rows[:, None] * som + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])

    _KERNEL = indexed_attention_kernel
    return _KERNEL


def triton_indexed_attention(q, k, v, key_index, log_weight=None, query_index=None, diagonal=False, scale=None,
                             block_m: int | None = None, *, block_n: int = BLOCK_N, num_warps: int | None = None,
                             num_stages: int = 2):
    """The module docstring's sums by the Triton kernel (``kernel='triton'``); (B, H, T, M, Dv). One program per
    ``block_m`` (64 or 128; default 128 for tiles of at least 128 rows, else 64: on an H100, 6.2 instead of 7.1 ms
    for KDEformer's causal tiles at n = 131,072) query rows of one tile, head and batch element, ``block_n`` (32,
    64 or 128) keys per step; ``num_warps`` (default 4 for 64 rows, 8 for 128) and ``num_stages`` are Triton's
    launch options. Expanded (stride-0) query indices and log-weights are read as they are."""
    b, h, t, m, length = _check(q, k, v, key_index, log_weight, query_index, diagonal)
    why = triton_supports(q, k, v)
    if why is not None:
        raise ValueError(f"indexed_attention: kernel='triton' cannot run: {why}")
    block_m = (128 if m >= 128 else 64) if block_m is None else block_m
    if block_m not in (64, 128) or block_n not in (32, 64, 128):
        raise ValueError(f"indexed_attention: block_m must be 64 or 128 and block_n 32, 64 or 128, got {block_m}, "
                         f"{block_n}")
    d, dv = q.shape[-1], v.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(b, h, t, m, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    qi = query_index if query_index is not None else key_index  # a placeholder pointer when HAS_QI is off
    lw = log_weight if log_weight is not None else key_index
    qi_strides = [qi.stride(i) if qi.shape[i] > 1 else 0 for i in range(4)]
    lw_strides = [lw.stride(i) if lw.shape[i] > 1 else 0 for i in range(4)]
    grid = (t * math.ceil(m / block_m), b * h)
    _kernel()[grid](q, k, v, key_index, qi, lw, out,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), *key_index.stride(), *qi_strides, *lw_strides,
                    out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                    h, m, length, scale * 1.4426950408889634,
                    HAS_QI=query_index is not None, HAS_W=log_weight is not None, DIAGONAL=bool(diagonal),
                    D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=num_warps or (4 if block_m == 64 else 8), num_stages=num_stages)
    return out


def choose_kernel(kernel: str, q, k, v) -> str:
    """'torch' or 'triton' for ``kernel`` in :data:`KERNELS` ('auto': triton for CUDA tensors it supports when no
    gradient is needed)."""
    if kernel not in KERNELS:
        raise ValueError(f"indexed_attention: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return "triton" if q.is_cuda and not needs_grad and triton_supports(q, k, v) is None else "torch"


def indexed_attention(q, k, v, key_index, log_weight=None, query_index=None, diagonal=False, scale=None,
                      kernel: str = "auto", block_m: int | None = None):
    """Attention of tiles of query rows to the keys of their index lists (module docstring); (B, H, T, M, Dv).

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv); key_index (B, H, T, L) int32 / int64 positions in
    [0, Nk); log_weight (B|1, H|1, T, L) or None; query_index (B|1, H|1, T, M) positions in [0, Nq) or None (tile t
    = rows t M .. t M + M - 1, Nq = T M); diagonal: the last M columns are each tile's own keys, block-causal;
    scale S (default 1 / sqrt(D)); kernel 'auto' | 'torch' | 'triton' (module docstring); block_m: query rows per
    Triton program (:func:`triton_indexed_attention`)."""
    if choose_kernel(kernel, q, k, v) == "triton":
        return triton_indexed_attention(q, k, v, key_index, log_weight, query_index, diagonal, scale, block_m)
    return reference_indexed_attention(q, k, v, key_index, log_weight, query_index, diagonal, scale)
