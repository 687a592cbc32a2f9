"""The positive random feature map of FAVOR+ as one fused Triton kernel (CUDA), forward and backward.

It computes exactly what ``common.random_features.positive_random_features`` computes (Choromanski et al. 2021,
Lemma 1; Reid et al. 2023, eq. 1), the reference it is tested against:

    phi(x) exp(-c) = exp(W x' - |x'|^2 / 2 - c) / sqrt(m),   x' = sqrt(S) x,

with the offset c each query's own largest logit (``offset='row'``), the largest logit of each (batch, head)
(``'global'``, for keys: a first pass writes every row's largest logit, PyTorch takes the maximum per (batch, head),
a second pass writes the features) or a given tensor. PyTorch needs about ten passes over (N, m) float32 tensors
for this (upcast, product, squared norms, subtraction, maximum, exponential, division, downcast); the kernel reads
x once (twice for keys) and writes the features once, in the input dtype. The arithmetic is float32: logits, their
maximum and exp, with one rounding to the input dtype at the store, since exp turns an absolute logit error into a
relative feature error. The product x W'^T (W' = sqrt(S) W): bfloat16 inputs are exact in bfloat16, and W' is
split into two bfloat16 halves (2^-17 relative), so two bfloat16 tensor-core products accumulated in float32 give
it to about float32 accuracy; float32 (and float16) inputs use IEEE float32 dot products (CUDA cores, slower).

Backward (c is treated as a constant, as the reference detaches it; it cancels between numerator and denominator):
with g = dL/dphi * phi (recomputed in float32 from x and the saved per-row offset, so no feature is kept for it),
dL/dx = g W' - S x sum_f g_f, one kernel (g split into bfloat16 halves like W' for bfloat16 inputs). The
projection W is a buffer, never trained: no gradient for it.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch

from common.random_features import positive_random_features

MAX_FEATURES = 512    # the (rows x m) float32 logits of one program must fit in registers
AUTO_MAX_FEATURES = 64  # feature_kernel='auto' fuses only up to here: verified on the H100 at m = 64; the 13:58 UTC
                        # run of 2026-11-25 saw a Triton compilation error at m = 256 (this kernel or fla's)
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())   # tl.dot needs power-of-two tiles of at least 16


def fused_features_available(x: torch.Tensor, projection: torch.Tensor) -> bool:
    """Whether :func:`fused_positive_random_features` runs for these inputs: CUDA, Triton installed, float32 /
    bfloat16 / float16 (bfloat16 on a GPU with bfloat16 tensor cores, compute capability 8 or more), at most
    :data:`MAX_FEATURES` features and :data:`MAX_HEAD_DIM` dims."""
    return (x.is_cuda and x.dtype in DTYPES and projection.shape[0] <= MAX_FEATURES
            and x.shape[-1] <= MAX_HEAD_DIM and importlib.util.find_spec("triton") is not None
            and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] >= 8))


@functools.cache
def _kernels():
    """Compiled on first use: Triton is imported only where the fused path is taken."""
    from . import feature_kernels
    return feature_kernels.features_forward, feature_kernels.features_backward


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(m: int, d: int) -> dict:
    bm = _pow2(m)
    return dict(D=d, M=m, BD=_pow2(d), BM=bm, BT=max(16, min(64, 8192 // bm)))


def _projection_operands(projection: torch.Tensor, scale: float, x: torch.Tensor):
    """(W_hi, W_lo, split) for the kernels: W' = sqrt(S) W in float32, split into two bfloat16 halves for bfloat16
    inputs (W_hi = W' rounded, W_lo = the rest rounded: W' to 2^-17 relative), else W' twice (the second unused)."""
    w = projection.to(device=x.device, dtype=torch.float32) * math.sqrt(scale)
    if x.dtype != torch.bfloat16:
        w = w.contiguous()
        return w, w, False
    w_hi = w.to(torch.bfloat16)
    return w_hi.contiguous(), (w - w_hi.float()).to(torch.bfloat16).contiguous(), True


class _PositiveFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projection, scale, offset):
        *lead, n, d = x.shape
        m = projection.shape[0]
        x2 = x.reshape(-1, d).contiguous()
        w_hi, w_lo, split = _projection_operands(projection, scale, x)
        rows = x2.shape[0]
        tiles = _tiles(m, d)
        grid = (_cdiv(rows, tiles["BT"]),)
        forward, _ = _kernels()
        log_norm = 0.5 * math.log(m)
        args = dict(scale=scale, log_norm=log_norm, SPLIT=split, **tiles)
        out = torch.empty(rows, m, device=x.device, dtype=x.dtype)
        rowmax = torch.empty(rows, device=x.device, dtype=torch.float32)
        groups = max(1, math.prod(lead))
        if not isinstance(offset, torch.Tensor) and offset == "row":
            forward[grid](x2, w_hi, w_lo, rowmax, out, rowmax, rows, max(n, 1), MODE=0, **args)
            c, c_rows = rowmax.view(*lead, n, 1), rowmax
        else:
            if isinstance(offset, torch.Tensor):
                c = offset.to(device=x.device, dtype=torch.float32).expand(*lead, 1, 1)
            else:  # 'global': every row's largest logit first, then the largest per (batch, head)
                forward[grid](x2, w_hi, w_lo, rowmax, out, rowmax, rows, max(n, 1), MODE=1, **args)
                c = rowmax.view(groups, n).amax(dim=1).view(*lead, 1, 1)
            per_group = c.reshape(groups).contiguous()
            forward[grid](x2, w_hi, w_lo, per_group, out, rowmax, rows, max(n, 1), MODE=2, **args)
            c_rows = per_group.repeat_interleave(n)
        ctx.save_for_backward(x2, w_hi, w_lo, c_rows)
        ctx.meta = (tuple(x.shape), x.dtype, args)
        ctx.mark_non_differentiable(c)
        return out.view(*lead, n, m), c

    @staticmethod
    def backward(ctx, dout, _dc):
        x2, w_hi, w_lo, c_rows = ctx.saved_tensors
        shape, dtype, args = ctx.meta
        rows, d = x2.shape
        dx = torch.empty(rows, d, device=x2.device, dtype=dtype)
        _, backward = _kernels()
        backward[(_cdiv(rows, args["BT"]),)](x2, w_hi, w_lo, c_rows, dout.reshape(rows, -1).contiguous(), dx, rows,
                                             **args)
        return dx.view(shape), None, None, None


def fused_positive_random_features(x: torch.Tensor, projection: torch.Tensor, scale: float,
                                   offset: str | torch.Tensor = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``common.random_features.positive_random_features`` (same arguments and result, to float32 rounding) in one
    fused kernel; raises a RuntimeError where it cannot run (:func:`fused_features_available`)."""
    if not fused_features_available(x, projection):
        raise RuntimeError("fused_positive_random_features: needs Triton, a CUDA tensor of float32, bfloat16 or "
                           f"float16, <= {MAX_FEATURES} features and head dim <= {MAX_HEAD_DIM}; got {x.dtype} on "
                           f"{x.device}, projection {tuple(projection.shape)}; use "
                           "common.random_features.positive_random_features")
    if not isinstance(offset, torch.Tensor) and offset not in ("row", "global"):
        return positive_random_features(x, projection, scale, offset)  # raises its ValueError naming the offset
    if x.numel() == 0:
        return positive_random_features(x, projection, scale, offset)
    return _PositiveFeatures.apply(x, projection, scale, offset)
