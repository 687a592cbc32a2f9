"""knn's device paths never read a value back to the host nor copy a tensor off its device (issue 13).

On any device, ``tests.sync_watch.HostReads`` (shared with the other packages' tests) watches every aten op: an op that must read device memory on the
host (``.item()``, ``int(t)``, ``bool(t)``: ``_local_scalar_dense``; ``nonzero``, ``unique``, ``masked_select``,
``bincount``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``: data-dependent shapes), a copy
to another device, or a result of one or more dimensions on another device is recorded, and ``.tolist()`` /
``.numpy()`` (which read memory without an op) raise. The control test shows it catches each of them. With CUDA
the same paths also run under ``torch.cuda.set_sync_debug_mode("error")`` (``tests.sync_watch.sync_debug_errors``),
which raises on any synchronisation.
"""
import pytest
import torch

import common
from common.data import synthetic_qkv
from tests.sync_watch import run_watched, sync_debug_errors

def test_the_watch_catches_host_reads(monkeypatch):
    x = torch.arange(6.0)
    for fn, expected in ((lambda: x.sum().item(), "_local_scalar_dense"), (lambda: int(x[2]), "_local_scalar_dense"),
                         (lambda: bool(x.any()), "_local_scalar_dense"), (lambda: (x > 2).nonzero(), "nonzero"),
                         (lambda: x.unique(), "unique"), (lambda: x[x > 2], "boolean mask"),
                         (lambda: x.repeat_interleave(x.long()), "output_size")):
        assert any(expected in f for f in run_watched(fn, "cpu", monkeypatch)[1]), expected
    meta = torch.zeros(3, device="meta")  # expecting 'meta': a CPU result, a copy from the CPU
    found = run_watched(lambda: meta + x[:3].to("meta"), "meta", monkeypatch)[1]
    assert any("another device" in f for f in found) and any("on cpu" in f for f in found)
    with pytest.raises(AssertionError, match="tolist"):
        run_watched(lambda: x.tolist(), "cpu", monkeypatch)
    assert run_watched(lambda: (x * 2).topk(3).indices.sort().values, "cpu", monkeypatch)[1] == []


# (options, causal) of every knn path that must stay on the device: every estimator x device index x causal mode
# that the options accept (the others are refused: test_refused_device_paths), and the sampled gradients
ESTIMATORS = ("topk", "topk_uniform_tail", "adaptive", "gumbel")
DEVICE_PATHS = ([({"index": "ivf_blocks", "estimator": e}, False) for e in ESTIMATORS[:2]]
                + [({"index": "ivf_blocks", "estimator": e, **layout}, True) for e in ESTIMATORS[:2]
                   for layout in ({"causal_block": 32}, {"causal_layout": "mask"})]
                + [({"index": "torch", "estimator": e, "k": 6}, c) for e in ESTIMATORS for c in (False, True)]
                + [({"index": "torch", "estimator": e, "k": 6, "gradient": "sampled", "dv_estimator": dv}, c)
                   for e, dv in (("adaptive", "scatter"), ("topk_uniform_tail", "walk")) for c in (False, True)]
                + [({"index": "ivf_torch", "estimator": e, "k": 6, "nlist": 6}, False) for e in ESTIMATORS[:3]])


def _qkv(device, dtype=torch.float32):
    x = synthetic_qkv("clustered", 1, 2, 96, head_dim=16, seed=0)
    return tuple(t.to(device, dtype) for t in (x.q, x.k, x.v))


def _path_id(case):
    options, causal = case
    layout = "-mask" if options.get("causal_layout") == "mask" else "-segments" if "causal_block" in options else ""
    grad = f"-sampled-{options['dv_estimator']}" if "dv_estimator" in options else ""
    return f"{options['index']}-{options['estimator']}-{'causal' if causal else 'full'}{layout}{grad}"


def _knn(options):
    # static_shapes=True: the layout knn takes off the CPU by default (lazy Gumbel sampling with static capacity)
    return common.get_attention("knn", seed=0, check_finite=False, num_samples=8, static_shapes=True, **options)


@pytest.mark.parametrize("case", DEVICE_PATHS, ids=_path_id)
def test_device_paths_read_nothing_back_on_cpu(case, monkeypatch):
    options, causal = case
    q, k, v = _qkv("cpu")
    attn = _knn(options)
    out, found = run_watched(lambda: attn(q, k, v, causal=causal), "cpu", monkeypatch)
    assert found == [] and out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("case", DEVICE_PATHS, ids=_path_id)
def test_device_backward_reads_nothing_back_on_cpu(case, monkeypatch):
    """The backward of every device path (autograd through the estimator and the routed attention, or the sampled
    gradient estimators of Sec. 5 with their lazy Gumbel samples and random walks) reads nothing back either."""
    options, causal = case
    inputs = tuple(t.requires_grad_() for t in _qkv("cpu"))
    attn = _knn(options)
    out = attn(*inputs, causal=causal)
    _, found = run_watched(lambda: out.backward(torch.ones_like(out)), "cpu", monkeypatch)
    assert found == [] and all(torch.isfinite(t.grad).all() for t in inputs)


def test_refused_device_paths():
    """What has no sync-free device path is refused by name: gumbel / sampled gradients with the approximate
    ivf_torch under static shapes (the widened cutoff has no static capacity), per-query estimators with
    ivf_blocks (no per-query lists)."""
    q, k, v = _qkv("cpu")
    for options, match in (({"index": "ivf_torch", "estimator": "gumbel", "nlist": 6}, "exact index"),
                           ({"index": "ivf_torch", "estimator": "adaptive", "gradient": "sampled", "nlist": 6},
                            "exact index"),
                           ({"index": "ivf_blocks", "estimator": "gumbel"}, "per-query"),
                           ({"index": "ivf_blocks", "estimator": "adaptive"}, "per-query")):
        with pytest.raises(ValueError, match=match):
            _knn(options)(q.clone().requires_grad_(), k, v)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DEVICE_PATHS, ids=_path_id)
def test_cuda_device_paths_never_synchronise_nor_leave_the_device(case, dtype, monkeypatch):
    options, causal = case
    inputs = tuple(t.requires_grad_() for t in _qkv("cuda", dtype))
    attn = common.get_attention("knn", seed=0, check_finite=False, num_samples=8, **options)  # default: static
    attn(*inputs, causal=causal).sum().backward()  # warm-up: lazy CUDA initialisation may synchronise once

    def forward_backward():
        with torch.no_grad():
            fast = attn(*inputs, causal=causal)  # the no-autograd path (ivf_blocks: the fused kernels' lse)
        out = attn(*inputs, causal=causal)
        out.backward(torch.ones_like(out))
        return fast, out
    with sync_debug_errors():
        (fast, out), found = run_watched(forward_backward, inputs[0].device, monkeypatch)
    assert found == [] and out.device == inputs[0].device and out.dtype == dtype and torch.isfinite(out).all()
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    assert all(t.grad.device == t.device and torch.isfinite(t.grad).all() for t in inputs)


@needs_cuda
@pytest.mark.parametrize("layout", [{}, {"causal_block": 64}, {"causal_layout": "mask"}],
                         ids=["default", "segments", "mask"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ivf_blocks_reading_every_block_equals_exact_with_gradients(layout, causal, dtype):
    """With every key block read, ivf_blocks on the GPU is exact attention: output and gradients equal the CPU
    float64 reference (to the dtype's rounding); without autograd too (the segments layout then takes the fused
    kernels' log-sum-exps, ``block_routing.attention_lse``)."""
    x = synthetic_qkv("clustered", 2, 2, 300, head_dim=32, seed=1, dtype=torch.float64)
    ref_in = tuple(t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    ref = common.softmax_attention(*ref_in, causal=causal)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref.backward(g)
    gpu_in = tuple(t.detach().to("cuda", dtype).requires_grad_() for t in (x.q, x.k, x.v))
    attn = common.get_attention("knn", index="ivf_blocks", nprobe=10 ** 6, seed=0, **layout)
    with torch.no_grad():
        fast = attn(*gpu_in, causal=causal)
    out = attn(*gpu_in, causal=causal)
    out.backward(g.to("cuda", dtype))
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative Frobenius error: rounding of the dtype
    assert out.device.type == "cuda" and out.dtype == dtype and fast.dtype == dtype
    for got, want in [(out, ref.detach()), (fast, ref.detach())] + [(t.grad, r.grad) for t, r in zip(gpu_in, ref_in)]:
        assert got.device.type == "cuda"
        assert ((got.double().cpu() - want).norm() / want.norm()).item() < tol


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_log_sum_exp_equals_the_tiled_reference(causal, dtype):
    """block_routing.attention_lse on CUDA (flash kernel in half precision, memory-efficient in float32) gives the
    out and lse of common.attention_with_lse in float64, without a warning (the kernels accepted the call)."""
    import warnings
    from knn_attention.block_routing import attention_lse
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 1, 128, d, generator=gen, dtype=torch.float64) for d in (66, 66, 72))
    want_out, want_lse = common.attention_with_lse(q, k, v, 0.2, causal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = attention_lse(*(t.to("cuda", dtype) for t in (q, k, v)), 0.2, causal)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert ((out.double().cpu() - want_out).norm() / want_out.norm()).item() < tol
    assert (lse.double().cpu() - want_lse).abs().max().item() < tol * want_lse.abs().max().item()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_triton_path_equals_the_sdpa_path(dtype):
    """Non-causal without autograd, ivf_blocks reads its keys through common.indexed_attention's Triton kernel (when
    triton imports): no fallback warning, and the same output as the differentiable SDPA path for one routing."""
    import warnings
    from common.indexed_attention import triton_available
    from knn_attention.block_routing import block_options, route, routed_attention
    if not triton_available():
        pytest.skip("triton is not importable")
    x = synthetic_qkv("clustered", 1, 4, 2048, head_dim=64, seed=3)
    q, k, v = (t.to("cuda", dtype) for t in (x.q, x.k, x.v))
    r = route(q, k, False, 0.125, block_options(2048, num_samples=45), torch.Generator("cuda").manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fast = routed_attention(q, k, v, False, 0.125, r)
    ref = routed_attention(q.clone().requires_grad_(), k, v, False, 0.125, r).detach()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert fast.dtype == dtype and ((fast.float() - ref.float()).norm() / ref.float().norm()).item() < tol
