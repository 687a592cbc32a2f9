"""Triton kernels of the fused positive random feature map (``triton_features.py`` is the module to use; it imports
this one only on a CUDA device with Triton installed)."""
import triton
import triton.language as tl


@triton.jit
def _logits(x_ptr, w_ptr, r, rmask, sqrt_scale, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
            BM: tl.constexpr):
    d = tl.arange(0, BD)
    f = tl.arange(0, BM)
    x = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    x = x.to(tl.float32) * sqrt_scale
    w = tl.load(w_ptr + f[:, None] * D + d[None, :], mask=(f[:, None] < M) & (d[None, :] < D), other=0.0)
    logits = tl.dot(x, tl.trans(w), input_precision="ieee") - 0.5 * tl.sum(x * x, axis=1)[:, None]
    return x, w, tl.where(f[None, :] < M, logits, float("-inf"))


@triton.jit
def features_forward(x_ptr, w_ptr, c_ptr, out_ptr, rowmax_ptr, rows, length, sqrt_scale, log_norm,
                     D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
                     MODE: tl.constexpr):
    # MODE 0: offset = the row's own max (write features and row maxima); 1: write row maxima only;
    # 2: offset = c_ptr[row // length], one per (batch, head) (write features)
    r = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = r < rows
    x, w, logits = _logits(x_ptr, w_ptr, r, rmask, sqrt_scale, D, M, BD, BM)
    if MODE == 2:
        c = tl.load(c_ptr + r // length, mask=rmask, other=0.0)
    else:
        c = tl.max(logits, axis=1)
        tl.store(rowmax_ptr + r, c, mask=rmask)
    if MODE != 1:
        f = tl.arange(0, BM)
        feats = tl.exp(logits - c[:, None] - log_norm)
        tl.store(out_ptr + r[:, None] * M + f[None, :], feats.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (f[None, :] < M))


@triton.jit
def features_backward(x_ptr, w_ptr, c_ptr, dout_ptr, dx_ptr, rows, sqrt_scale, log_norm, D: tl.constexpr,
                      M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr):
    r = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = r < rows
    x, w, logits = _logits(x_ptr, w_ptr, r, rmask, sqrt_scale, D, M, BD, BM)
    c = tl.load(c_ptr + r, mask=rmask, other=0.0)
    f = tl.arange(0, BM)
    fmask = rmask[:, None] & (f[None, :] < M)
    dout = tl.load(dout_ptr + r[:, None] * M + f[None, :], mask=fmask, other=0.0).to(tl.float32)
    g = tl.where(fmask, dout * tl.exp(logits - c[:, None] - log_norm), 0.0)     # dL/dlogits
    dx = (tl.dot(g, w, input_precision="ieee") - x * tl.sum(g, axis=1)[:, None]) * sqrt_scale
    d = tl.arange(0, BD)
    tl.store(dx_ptr + r[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None] & (d[None, :] < D))
