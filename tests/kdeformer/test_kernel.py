"""KDEformer's ``kernel`` option (common.indexed_attention): 'triton' gives the estimate of 'torch' for the same
draws, under the Triton interpreter on CPU tensors and on CUDA; 'auto' is 'torch' on the CPU."""
import pytest
import torch

import common
from common.data import synthetic_qkv
from common.indexed_attention import triton_available
from tests.common.test_indexed_attention import run_under_interpreter

OPTIONS = dict(bucket_size=16, sample_size=32, chunk_size=16, seed=0)


def test_auto_is_the_torch_kernel_on_the_cpu_and_a_bad_kernel_is_named():
    x = synthetic_qkv("clustered", 1, 2, 96, 96, 8, seed=0)
    for causal in (False, True):
        auto = common.get_attention("kdeformer", **OPTIONS)(x.q, x.k, x.v, causal=causal)
        torch_kernel = common.get_attention("kdeformer", kernel="torch", **OPTIONS)(x.q, x.k, x.v, causal=causal)
        assert torch.equal(auto, torch_kernel)
    with pytest.raises(ValueError, match="kdeformer: kernel must be one of"):
        common.get_attention("kdeformer", kernel="cuda")


def relative_difference(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_differences(n, d, dtype, device, options=OPTIONS, nq=None):
    """{(causal, Nq): relative difference of kernel='triton' to kernel='torch'} on the clustered input."""
    x = synthetic_qkv("clustered", 1, 2, n, n, d, dtype=getattr(torch, dtype), seed=1)
    q, k, v = (t.to(device) for t in (x.q, x.k, x.v))
    out = {}
    for causal in (False, True):
        for rows in (n, nq or n):
            ref = common.get_attention("kdeformer", kernel="torch", **options)(q[:, :, -rows:], k, v, causal=causal)
            got = common.get_attention("kdeformer", kernel="triton", **options)(q[:, :, -rows:], k, v, causal=causal)
            assert got.dtype == q.dtype and got.device == q.device
            out[f"{causal} {rows}"] = relative_difference(got, ref)
    return out


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
def test_triton_kernel_gives_the_torch_estimate_under_the_interpreter():
    # non-causal LSH blocks + samples, causal chunks + windows + strata; all queries and the last 40 (Nq < Nk)
    result = run_under_interpreter("""
        import json
        from tests.kdeformer.test_kernel import kernel_differences
        print(json.dumps(kernel_differences(96, 16, "float32", "cpu", nq=40)))
    """)
    assert len(result) == 4 and all(diff < 1e-5 for diff in result.values()), result


CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")


@CUDA
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float16", 5e-3)])  # float32: the kernel test
def test_triton_kernel_gives_the_torch_estimate_on_cuda(dtype, tol):
    # bfloat16 / float16: the torch kernel rounds the log-weights (non-causal) or the weights (causal) to the input
    # dtype, the triton kernel adds them in float32
    for n, d, options in ((1024, 64, OPTIONS), (2048, 128, dict(bucket_size=64, sample_size=64, chunk_size=128,
                                                                  seed=0))):
        result = kernel_differences(n, d, dtype, "cuda", options, nq=n // 3)
        assert all(diff < tol for diff in result.values()), (n, d, result)


@CUDA
def test_auto_is_triton_on_cuda_without_gradients_and_torch_with_them():
    x = synthetic_qkv("clustered", 1, 2, 512, 512, 64, dtype=torch.bfloat16, seed=0)
    q, k, v = (t.cuda() for t in (x.q, x.k, x.v))
    for causal in (False, True):
        with torch.no_grad():
            auto = common.get_attention("kdeformer", **OPTIONS)(q, k, v, causal=causal)
            triton_kernel = common.get_attention("kdeformer", kernel="triton", **OPTIONS)(q, k, v, causal=causal)
        assert torch.equal(auto, triton_kernel)
        q_grad = q.clone().requires_grad_(True)
        out = common.get_attention("kdeformer", **OPTIONS)(q_grad, k, v, causal=causal)
        out.float().sum().backward()
        assert torch.isfinite(q_grad.grad).all()


@CUDA
def test_the_triton_path_does_not_synchronise_on_cuda():
    # at r = 7 bits and chunks of 64 the causal path's count table takes all 2^r codes (no torch.unique)
    x = synthetic_qkv("clustered", 1, 2, 4096, 4096, 64, dtype=torch.bfloat16, seed=0)
    q, k, v = (t.cuda() for t in (x.q, x.k, x.v))
    attn = common.get_attention("kdeformer", bucket_size=64, sample_size=128, kernel="triton", check_finite=False,
                                seed=0)
    with torch.no_grad():
        for causal in (False, True):
            attn(q, k, v, causal=causal)  # warm-up: compilation, lazy initialisation
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                attn(q, k, v, causal=causal)
            finally:
                torch.cuda.set_sync_debug_mode("default")
