"""knn's retrieval wired to knn_attention/device_index.py (issue 13): index='torch' is blocked_top_k and equals
faiss 'flat' on the CPU, 'ivf_torch' probing every chunk is exact, retrieval stays on the input's device ('meta',
CPU), faiss kinds off the CPU, and (with CUDA) estimator (a) on the GPU equals the CPU under sync debug mode "error"
(every estimator's sync-free run: test_no_host_sync.py)."""
import pytest
import torch

import common
from common.data import synthetic_qkv
from knn_attention.device_index import blocked_top_k
from knn_attention.index import IndexOptions, causal_top_k_indices, top_k_indices
from tests.sync_watch import sync_debug_errors

ESTIMATORS = ("topk", "topk_uniform_tail", "adaptive")


def qkv(n=48, d=8, seed=0):
    return synthetic_qkv("gaussian", 2, 2, n, head_dim=d, seed=seed, dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_index_equals_faiss_flat_on_cpu(causal, estimator):
    pytest.importorskip("faiss")
    x = qkv()
    outs = [common.get_attention("knn", k=6, num_samples=5, estimator=estimator, index=index, seed=3)(
        x.q, x.k, x.v, causal=causal) for index in ("flat", "torch")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_index_retrieval_equals_flat(causal):
    pytest.importorskip("faiss")
    x = synthetic_qkv("gaussian", 2, 3, 40, head_dim=8, seed=1)
    if causal:
        got = [causal_top_k_indices(x.q, x.k, 5, 7, IndexOptions(kind)) for kind in ("flat", "torch")]
    else:
        got = [top_k_indices(x.q, x.k, 5, IndexOptions(kind)) for kind in ("flat", "torch")]
    assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ivf_torch_probing_every_chunk_equals_torch(estimator):
    x = qkv(n=64)
    outs = [common.get_attention("knn", k=6, num_samples=5, estimator=estimator, index=index, seed=2, **extra)(
        x.q, x.k, x.v) for index, extra in (("torch", {}), ("ivf_torch", {"nlist": 5, "nprobe": 10 ** 6}))]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    x32 = synthetic_qkv("gaussian", 2, 2, 64, head_dim=8, seed=4)
    exact = top_k_indices(x32.q, x32.k, 6, IndexOptions("torch"))
    assert torch.equal(top_k_indices(x32.q, x32.k, 6, IndexOptions("ivf_torch", nlist=5, nprobe=10 ** 6)), exact)


def test_ivf_torch_is_approximate_and_refuses_causal():
    x = qkv(n=64)
    out = common.get_attention("knn", k=6, num_samples=5, index="ivf_torch", nlist=8, nprobe=2, seed=0)(
        x.q, x.k, x.v)
    assert out.shape == x.q.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="ivf_torch.*causal"):
        common.get_attention("knn", k=6, index="ivf_torch", seed=0)(x.q, x.k, x.v, causal=True)
    with pytest.raises(ValueError, match="cell_size"):
        common.get_attention("knn", index="ivf_torch", cell_size=0)


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("kind", ["torch", "ivf_torch", "flat"])
def test_retrieval_returns_tensors_on_the_input_device(device, kind):
    gen = torch.Generator().manual_seed(0)  # not the global stream: later statistical tests read it
    q, k = (torch.randn(1, 2, n, 4, generator=gen).to(device) for n in (20, 24))
    if kind == "flat" and device == "cpu":
        pytest.importorskip("faiss")
    hits = top_k_indices(q, k, 5, IndexOptions(kind))
    assert hits.device.type == device and hits.shape == (1, 2, 20, 5) and hits.dtype == torch.long
    if kind != "ivf_torch":
        causal = causal_top_k_indices(q, k, 5, 4, IndexOptions(kind))
        assert causal.device.type == device and causal.shape == (1, 2, 20, 5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_approximate_kinds_refuse_non_cpu_tensors(kind):
    q = torch.randn(1, 1, 8, 4, device="meta")
    with pytest.raises(ValueError, match="CPU-only.*ivf_torch"):
        top_k_indices(q, q, 3, IndexOptions(kind))
    if kind == "hnsw":
        with pytest.raises(ValueError, match="CPU-only"):
            causal_top_k_indices(q, q, 3, 4, IndexOptions(kind))


def test_torch_branch_is_blocked_top_k():
    x = synthetic_qkv("gaussian", 1, 2, 30, head_dim=8, seed=5)
    assert torch.equal(top_k_indices(x.q, x.k, 4, IndexOptions("torch")), blocked_top_k(x.q, x.k, 4).indices)
    assert torch.equal(causal_top_k_indices(x.q, x.k, 4, 6, IndexOptions("torch")),
                       blocked_top_k(x.q, x.k, 4, causal=True, causal_block=6).indices)


GPU_CASES = [("torch", False), ("torch", True), ("flat", False), ("flat", True), ("ivf_torch", False)]


def _gpu_run(index, causal, estimator):
    """knn on CUDA under sync debug mode "error" (any host synchronisation raises), with its CPU reference;
    'ivf_torch' probes every chunk so that it is exact (its k-means draws differ between devices)."""
    x = synthetic_qkv("clustered", 1, 2, 256, head_dim=16, seed=0)
    extra = {"nprobe": 10 ** 6} if index == "ivf_torch" else {}
    make = lambda: common.get_attention("knn", k=8, num_samples=8, estimator=estimator, index=index, seed=0,
                                        check_finite=False, **extra)
    q, k, v = (t.cuda() for t in (x.q, x.k, x.v))
    attn = make()
    attn(q, k, v, causal=causal)  # warm-up: lazy CUDA initialisation may synchronise once
    with sync_debug_errors():
        out = attn(q, k, v, causal=causal)
    assert out.device.type == "cuda" and out.dtype == q.dtype
    return out.cpu(), make()(x.q, x.k, x.v, causal=causal)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index,causal", GPU_CASES)
def test_gpu_topk_estimator_runs_without_host_sync_and_equals_cpu(index, causal):
    out, ref = _gpu_run(index, causal, "topk")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
