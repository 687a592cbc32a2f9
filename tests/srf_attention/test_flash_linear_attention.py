"""The fused Triton kernel (attn_fn='flash') against the PyTorch form: refused clearly on CPU, equal on a GPU.

The GPU half needs CUDA and Triton, which the CPU CI does not have; it was run on a lent H100 (README.md).
"""
import importlib.util

import pytest
import torch

from common.data import synthetic_qkv
from srf_attention.fast_attention import FastAttention
from srf_attention.flash_linear_attention import check_available, flash_linear_attention

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def test_refused_on_cpu_naming_the_alternative():
    with pytest.raises(RuntimeError, match=r"attn_fn='flash' is a Triton kernel for CUDA devices.*use attn_fn='torch'"):
        check_available(torch.device("cpu"))
    fast = FastAttention(8, 8, causal=True, seed=0).train().redraw_on_call_(True)
    before = fast.projection.clone()
    x = synthetic_qkv("gaussian", 1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match="use attn_fn='torch'"):
        fast(x.q, x.k, x.v, attn_fn="flash")
    assert torch.equal(fast.projection, before)  # a refused call redraws nothing
    with pytest.raises(ValueError, match="supports nb_features <= 128.*use attn_fn='torch'"):
        flash_linear_attention(torch.zeros(1, 1, 4, 200), torch.zeros(1, 1, 4, 200), torch.zeros(1, 1, 4, 3), True)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8, 8), (2, 3, 100, 100, 16, 20), (1, 2, 30, 130, 32, 64),
                                   (1, 4, 1000, 1000, 64, 64)])
def test_cuda_flash_equals_torch(causal, shape):
    b, h, nq, nk, d, m = shape
    x = synthetic_qkv("gaussian", b, h, nq, nk, d, seed=0, device="cuda")
    fast = FastAttention(d, m, causal=causal, seed=0).cuda()
    grad_out = torch.randn_like(x.v[:, :, :nq])  # one upstream gradient for both, so only the paths differ
    grads, outs = [], []
    for attn_fn in ("torch", "flash"):
        ins = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
        out = fast(*ins, attn_fn=attn_fn)
        outs.append(out)
        grads.append(torch.autograd.grad(out, ins, grad_out))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    # The flash backward recomputes the PyTorch form, but its float32 sums are not ordered like those of the
    # first pass: on a lent H100 the largest gap was 1.15e-5 (one element of 256,000, L = 1000, causal).
    for g_torch, g_flash in zip(*grads):
        torch.testing.assert_close(g_flash, g_torch, rtol=1e-4, atol=5e-5)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and Triton")
def test_cuda_flash_bfloat16():
    x = synthetic_qkv("gaussian", 1, 2, 300, 300, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    fast = FastAttention(64, 64, causal=True, seed=0).cuda()
    out = fast(x.q, x.k, x.v, attn_fn="flash")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fast(x.q, x.k, x.v), rtol=2e-2, atol=2e-2)


def test_benchmark_script_refuses_the_cpu_and_the_kernel_file_has_no_main():
    """The benchmark lives in ``benchmark_flash.py`` (a script); the kernel module is a library with no ``main``.
    The script refuses a CPU device on any machine (on a GPU it is run by hand: its checks are the CUDA tests above)."""
    import srf_attention.flash_linear_attention as kernel_module
    from srf_attention import benchmark_flash

    assert not hasattr(kernel_module, "main")
    with pytest.raises(SystemExit):
        benchmark_flash.main(["--device", "cpu", "--quick"])
