"""A fused Triton kernel of linear attention (no softmax): the ``attn_fn='flash'`` path of FastAttention's train mode.

It computes the same thing as ``common.linear_attention`` (Performer Sec. 2, causal by prefix sums) for given
features phi(Q), phi(K) and augmented values [V, 1]: each program owns one (batch*head, block of value columns),
walks the sequence chunk by chunk and keeps the running state sum_j phi(k_j) v_j^T (m x block) in registers, so
neither the per-chunk states nor the chunk score matrices ever reach GPU memory:

    causal:      out_c = phi(Q_c) S + tril(phi(Q_c) phi(K_c)^T) V_c,   then  S += phi(K_c)^T V_c;
    non-causal:  S = phi(K)^T V in a first pass, out = phi(Q) S in a second.

The backward pass recomputes the PyTorch form and differentiates it (gradient checkpointing of this one
operation): gradients are exact, the forward is fused, the backward is not. Everything runs in float32 with IEEE
dot products (no TF32), since the features of long sequences are summed over thousands of positions.

Needs a CUDA device and Triton; elsewhere :func:`check_available` raises naming the alternative,
``attn_fn='torch'``. Check it on a GPU with ``python -m srf_attention.benchmark_flash``, which compares it with the
PyTorch form and times both.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from common.linear_attention import chunk_linear_attention

BLOCK = 64  # positions per chunk
MAX_FEATURES = 128  # with m padded to 256 the tiles need 320 KiB of shared memory, more than an H100 has


def check_available(device: torch.device) -> None:
    """Raise a RuntimeError unless ``device`` is CUDA and Triton is installed; the message names attn_fn='torch'."""
    if torch.device(device).type != "cuda" or importlib.util.find_spec("triton") is None:
        missing = "Triton is not installed" if importlib.util.find_spec("triton") is None else f"tensors are on {device}"
        raise RuntimeError(f"FastAttention: attn_fn='flash' is a Triton kernel for CUDA devices ({missing}); "
                           "use attn_fn='torch'")


@functools.cache
def _kernel():
    """Compile-on-first-use: Triton is imported only where the flash path is actually taken."""
    import triton
    import triton.language as tl

    @triton.jit
    def linear_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, length, M: tl.constexpr, E: tl.constexpr,
                                BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr):
        bh = tl.program_id(0)
        e0 = tl.program_id(1) * BLOCK_E
        t = tl.arange(0, BLOCK_T)
        f = tl.arange(0, M)
        cols = e0 + tl.arange(0, BLOCK_E)
        q_base, k_base = q_ptr + bh * length * M, k_ptr + bh * length * M
        v_base, o_base = v_ptr + bh * length * E, o_ptr + bh * length * E
        state = tl.zeros((M, BLOCK_E), dtype=tl.float32)
        if CAUSAL:
            lower = t[:, None] >= t[None, :]
            for start in range(0, length, BLOCK_T):
                rows = start + t
                q = tl.load(q_base + rows[:, None] * M + f[None, :])
                k = tl.load(k_base + rows[:, None] * M + f[None, :])
                v = tl.load(v_base + rows[:, None] * E + cols[None, :])
                scores = tl.where(lower, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
                out = tl.dot(q, state, input_precision="ieee") + tl.dot(scores, v, input_precision="ieee")
                state += tl.dot(tl.trans(k), v, input_precision="ieee")
                tl.store(o_base + rows[:, None] * E + cols[None, :], out)
        else:
            for start in range(0, length, BLOCK_T):
                rows = start + t
                k = tl.load(k_base + rows[:, None] * M + f[None, :])
                v = tl.load(v_base + rows[:, None] * E + cols[None, :])
                state += tl.dot(tl.trans(k), v, input_precision="ieee")
            for start in range(0, length, BLOCK_T):
                rows = start + t
                q = tl.load(q_base + rows[:, None] * M + f[None, :])
                tl.store(o_base + rows[:, None] * E + cols[None, :], tl.dot(q, state, input_precision="ieee"))

    return linear_attention_kernel


def _padded(x: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """(B, H, N, w) -> contiguous float32 (B*H, length, width), zero-padded: zero features and zero values add
    nothing to any sum, and padded positions come after every real one."""
    b, h, n, w = x.shape
    out = x.new_zeros(b * h, length, width, dtype=torch.float32)
    out[:, :n, :w] = x.reshape(b * h, n, w)
    return out


def _fused_forward(qf, kf, v_aug, causal: bool) -> torch.Tensor:
    b, h, n, m = qf.shape
    e = v_aug.shape[-1]
    length = -(-n // BLOCK) * BLOCK
    m_pad = max(16, 1 << (m - 1).bit_length())  # tl.dot needs powers of two >= 16
    e_pad = max(16, 1 << (e - 1).bit_length())
    block_e = min(e_pad, 32)  # more programs per head: the GPU has ~130 SMs to fill
    q, k, v = _padded(qf, length, m_pad), _padded(kf, length, m_pad), _padded(v_aug, length, e_pad)
    out = torch.empty_like(v)
    grid = (b * h, e_pad // block_e)
    _kernel()[grid](q, k, v, out, length, M=m_pad, E=e_pad, BLOCK_E=block_e, BLOCK_T=BLOCK, CAUSAL=causal)
    return out[:, :n, :e].reshape(b, h, n, e).to(v_aug.dtype)


class _FlashLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v_aug, causal):
        ctx.save_for_backward(qf, kf, v_aug)
        ctx.causal = causal
        return _fused_forward(qf, kf, v_aug, causal)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = torch_linear_attention(*inputs, ctx.causal)
        return (*torch.autograd.grad(out, inputs, grad_out), None)


def torch_linear_attention(qf, kf, v_aug, causal: bool) -> torch.Tensor:
    """The PyTorch form the kernel must equal (queries and keys of one length)."""
    return chunk_linear_attention(qf, kf, v_aug, causal, BLOCK)[0]


def flash_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v_aug: torch.Tensor, causal: bool) -> torch.Tensor:
    """phi(Q) (prefix) sums of phi(K)^T V_aug with the fused kernel; qf, kf (B, H, N, m), v_aug (B, H, N, e).

    With causal and fewer queries than keys the queries are the last ones: zero features stand in for the
    earlier positions (a zero query reads nothing) and their rows are dropped.
    """
    if qf.shape[-1] > MAX_FEATURES:
        raise ValueError(f"FastAttention: attn_fn='flash' supports nb_features <= {MAX_FEATURES} (the kernel's tiles "
                         f"must fit in shared memory), got {qf.shape[-1]}; use attn_fn='torch'")
    check_available(qf.device)
    past = kf.shape[2] - qf.shape[2]
    if past:
        qf = torch.cat([qf.new_zeros(*qf.shape[:2], past, qf.shape[-1]), qf], dim=2)
    return _FlashLinearAttention.apply(qf, kf, v_aug, causal)[:, :, past:]
