"""Triton kernels of the fused positive random feature map (``triton_features.py`` is the module to use; it imports
this one only on a CUDA device with Triton installed).

The projection arrives pre-scaled, W' = sqrt(S) W (float32), so logits = x W'^T - S |x|^2 / 2. With SPLIT (bfloat16
inputs, exact in bfloat16) W' arrives as two bfloat16 halves, W' = W_hi + W_lo up to 2^-17 relative, and x W'^T is
two bfloat16 tensor-core products accumulated in float32; the backward's g W' splits g the same way (three
products: g_hi W_hi + g_hi W_lo + g_lo W_hi). Without SPLIT (float32, float16 inputs) the products are IEEE float32
dot products, which Triton runs on the CUDA cores, several times slower.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(ptr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """The (BM, BD) tile of a row-major (M, D) matrix, zero-padded."""
    f = tl.arange(0, BM)
    d = tl.arange(0, BD)
    return tl.load(ptr + f[:, None] * D + d[None, :], mask=(f[:, None] < M) & (d[None, :] < D), other=0.0)


@triton.jit
def _logits(x_ptr, w_hi, w_lo, r, rmask, scale, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
            BM: tl.constexpr, SPLIT: tl.constexpr):
    """(x in float32, logits x W'^T - S |x|^2 / 2 with -inf in the padded feature columns) for rows r."""
    d = tl.arange(0, BD)
    f = tl.arange(0, BM)
    x = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    xf = x.to(tl.float32)
    if SPLIT:
        xb = x.to(tl.bfloat16)
        logits = tl.dot(xb, tl.trans(w_hi))
        logits = tl.dot(xb, tl.trans(w_lo), logits)
    else:
        logits = tl.dot(xf, tl.trans(w_hi), input_precision="ieee")
    logits = logits - 0.5 * scale * tl.sum(xf * xf, axis=1)[:, None]
    return xf, tl.where(f[None, :] < M, logits, float("-inf"))


@triton.jit
def features_forward(x_ptr, w_hi_ptr, w_lo_ptr, c_ptr, out_ptr, rowmax_ptr, rows, length, scale, log_norm,
                     D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
                     MODE: tl.constexpr, SPLIT: tl.constexpr):
    # MODE 0: offset = the row's own max (write features and row maxima); 1: write row maxima only;
    # 2: offset = c_ptr[row // length], one per (batch, head) (write features)
    r = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = r < rows
    w_hi = _tile(w_hi_ptr, D, M, BD, BM)
    w_lo = _tile(w_lo_ptr, D, M, BD, BM)
    _, logits = _logits(x_ptr, w_hi, w_lo, r, rmask, scale, D, M, BD, BM, SPLIT)
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
def features_backward(x_ptr, w_hi_ptr, w_lo_ptr, c_ptr, dout_ptr, dx_ptr, rows, scale, log_norm,
                      D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
                      SPLIT: tl.constexpr):
    r = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = r < rows
    w_hi = _tile(w_hi_ptr, D, M, BD, BM)
    w_lo = _tile(w_lo_ptr, D, M, BD, BM)
    xf, logits = _logits(x_ptr, w_hi, w_lo, r, rmask, scale, D, M, BD, BM, SPLIT)
    c = tl.load(c_ptr + r, mask=rmask, other=0.0)
    f = tl.arange(0, BM)
    fmask = rmask[:, None] & (f[None, :] < M)
    dout = tl.load(dout_ptr + r[:, None] * M + f[None, :], mask=fmask, other=0.0).to(tl.float32)
    g = tl.where(fmask, dout * tl.exp(logits - c[:, None] - log_norm), 0.0)     # dL/dlogits
    if SPLIT:
        g_hi = g.to(tl.bfloat16)
        g_lo = (g - g_hi.to(tl.float32)).to(tl.bfloat16)
        gw = tl.dot(g_hi, w_hi)
        gw = tl.dot(g_hi, w_lo, gw)
        gw = tl.dot(g_lo, w_hi, gw)
    else:
        gw = tl.dot(g, w_hi, input_precision="ieee")
    dx = gw - scale * xf * tl.sum(g, axis=1)[:, None]          # dL/dx = g W' - S x sum_f g_f
    d = tl.arange(0, BD)
    tl.store(dx_ptr + r[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None] & (d[None, :] < D))
