"""Retrieval on the tensors' device (knn_attention/device_index.py): the exact blocked top-k against torch.topk on the
full masked score matrix, the device IVF against exact, causality, devices, and (with CUDA) the GPU path."""
import pytest
import torch

from common.attention import causal_query_positions
from common.data import synthetic_qkv
from knn_attention.device_index import blocked_top_k, build_device_cells, ivf_top_k
from knn_attention.index import IndexOptions, causal_top_k_indices
from tests.sync_watch import sync_debug_errors

NEG_INF = float("-inf")


def limits(nq, nk, causal, causal_block):
    """Query i may retrieve keys j < limit_i (the rule of the module docstring, written out here)."""
    if not causal:
        return torch.full((nq,), nk)
    p = causal_query_positions(nq, nk)
    return p + 1 if causal_block is None else p // causal_block * causal_block


def reference_top_k(q, k, top_k, causal=False, causal_block=None):
    """torch.topk of the full masked score matrix (float32 for half inputs), -1 where the score is -inf."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.to(dtype) @ k.to(dtype).transpose(-1, -2)
    nq, nk = q.shape[2], k.shape[2]
    s = s.masked_fill(torch.arange(nk) >= limits(nq, nk, causal, causal_block).unsqueeze(-1), NEG_INF)
    s = torch.nn.functional.pad(s, (0, max(0, top_k - nk)), value=NEG_INF)
    best = s.topk(top_k, dim=-1)
    return best.values.float(), best.indices.masked_fill(best.values == NEG_INF, -1)


def recall(found, ref):
    """Fraction of the reference's real keys (>= 0) that ``found`` holds, per query row."""
    hit = (found.unsqueeze(-1) == ref.unsqueeze(-2)) & (ref.unsqueeze(-2) >= 0)
    return hit.any(-1).sum().item() / (ref >= 0).sum().item()


def assert_same_top_k(result, ref_values, ref_indices, atol):
    assert result.scores.dtype == torch.float32 and result.indices.dtype == torch.long
    assert result.scores.shape == ref_values.shape == result.indices.shape
    torch.testing.assert_close(result.scores, ref_values, atol=atol, rtol=0)
    # index sets per row (the order of equal scores is not specified; the inputs are tie-free)
    assert torch.equal(result.indices.sort(-1).values, ref_indices.sort(-1).values)
    assert torch.equal(result.indices < 0, result.scores == NEG_INF)


@pytest.mark.parametrize("causal,causal_block", [(False, None), (True, None), (True, 4)])
@pytest.mark.parametrize("key_block", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_blocked_top_k_equals_full_topk(causal, causal_block, key_block, dtype):
    x = synthetic_qkv("gaussian", 2, 3, 13, 29, 6, seed=3, dtype=dtype)  # Nq < Nk: bottom-right alignment
    for top_k in (1, 5, 40):  # 40 > Nk: every row padded
        result = blocked_top_k(x.q, x.k, top_k, causal=causal, causal_block=causal_block, key_block=key_block)
        values, indices = reference_top_k(x.q, x.k, top_k, causal, causal_block)
        assert_same_top_k(result, values, indices, atol=1e-5)


def test_early_causal_rows_are_padded():
    # Nq = Nk = 10, k = 6: query i holds its i + 1 allowed keys first, then -1 with score -inf
    x = synthetic_qkv("gaussian", 1, 1, 10, 10, 4, seed=1, dtype=torch.float64)
    result = blocked_top_k(x.q, x.k, 6, causal=True, key_block=3)
    for i in range(10):
        real = min(i + 1, 6)
        assert (result.indices[0, 0, i, :real] >= 0).all() and (result.indices[0, 0, i, real:] == -1).all()
        assert (result.indices[0, 0, i, :real] <= i).all() and (result.scores[0, 0, i, real:] == NEG_INF).all()
    assert (result.scores[..., :-1] >= result.scores[..., 1:]).all()  # best first


def test_block_causal_matches_the_cpu_index():
    # causal_block = b is the rule of index.causal_top_k_indices, which forward_pass uses
    x = synthetic_qkv("gaussian", 2, 2, 21, 30, 5, seed=2, dtype=torch.float64)
    cpu = causal_top_k_indices(x.q, x.k, 4, 6, IndexOptions("torch"))
    device = blocked_top_k(x.q, x.k, 4, causal=True, causal_block=6, key_block=5).indices
    assert torch.equal(device.sort(-1).values, cpu.sort(-1).values)


def test_device_cells_partition_the_keys():
    keys = synthetic_qkv("clustered", 1, 3, 4, 300, 8, seed=0).k[0]
    cells = build_device_cells(keys, nlist=10, cell_size=16, generator=torch.Generator().manual_seed(0))
    for g in range(3):
        ids = cells.chunk_keys[g]
        assert torch.equal(ids[ids >= 0].sort().values, torch.arange(300))  # every key once
        for c, chunk in enumerate(ids):  # a chunk holds keys of one cell, in increasing position
            real = chunk[chunk >= 0]
            assert cells.first_key[g, c] == (real.min() if real.numel() else 300)
            assert (cells.cell_of_key[g, real] == cells.cell_of_key[g, real[:1]]).all()
            assert (real[1:] > real[:-1]).all()
            assert torch.equal(cells.chunk_vectors[g, c, :real.numel()], keys[g, real])


@pytest.mark.parametrize("causal,causal_block", [(False, None), (True, None), (True, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ivf_probing_every_chunk_is_exact(causal, causal_block, dtype):
    x = synthetic_qkv("clustered", 2, 2, 37, 50, 8, seed=4, dtype=dtype)
    for top_k in (3, 60):
        result = ivf_top_k(x.q, x.k, top_k, nlist=5, nprobe=10 ** 6, causal=causal, causal_block=causal_block)
        values, indices = reference_top_k(x.q, x.k, top_k, causal, causal_block)
        assert_same_top_k(result, values, indices, atol=1e-5)


def test_ivf_recall_on_clustered_keys():
    # nlist = 4 sqrt(Nk) = 128 k-means cells of ~8 keys; nprobe = 8 chunks score ~64 of 1024 keys per query
    # (6%), and find most of the true top 16 (measured 0.84-0.85 over seeds 0-2; 0.50 with nprobe = 4)
    x = synthetic_qkv("clustered", 2, 2, 512, 1024, 32, seed=1)
    exact = blocked_top_k(x.q, x.k, 16).indices
    assert recall(ivf_top_k(x.q, x.k, 16, nprobe=8, seed=0).indices, exact) > 0.75
    assert recall(ivf_top_k(x.q, x.k, 16, nprobe=16, seed=0).indices, exact) > 0.97


@pytest.mark.parametrize("causal_block", [None, 16])
def test_causal_ivf_never_returns_a_future_key(causal_block):
    x = synthetic_qkv("clustered", 1, 2, 200, 256, 16, seed=5)
    result = ivf_top_k(x.q, x.k, 12, nprobe=4, causal=True, causal_block=causal_block)
    bound = limits(200, 256, True, causal_block).view(1, 1, -1, 1)
    real = result.indices >= 0
    assert (result.indices < bound).all() and torch.equal(real, result.scores > NEG_INF)
    assert real.any(-1)[..., bound.view(-1) > 0].all()  # every query that may read a key finds one
    ids = torch.where(real, result.indices, -1 - torch.arange(12))  # pads made distinct: keys must be distinct
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_results_stay_on_the_input_device(device):
    q, k = torch.randn(2, 3, 9, 4, device=device), torch.randn(2, 3, 17, 4, device=device)
    for causal in (False, True):
        for result in (blocked_top_k(q, k, 5, causal=causal, key_block=4),
                       ivf_top_k(q, k, 5, nlist=3, nprobe=2, causal=causal)):
            for t in result:
                assert t.device.type == device and t.shape == (2, 3, 9, 5)
            assert result.scores.dtype == torch.float32 and result.indices.dtype == torch.long


def test_bad_arguments():
    q, k = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 6, 3)
    with pytest.raises(ValueError, match="knn.*k"):
        blocked_top_k(q, k, 0)
    with pytest.raises(ValueError, match="knn.*key_block"):
        blocked_top_k(q, k, 2, key_block=0)
    with pytest.raises(ValueError, match="knn.*causal_block"):
        ivf_top_k(q, k, 2, causal=True, causal_block=0)
    with pytest.raises(ValueError, match="knn.*nprobe"):
        ivf_top_k(q, k, 2, nprobe=0)
    with pytest.raises(ValueError, match="knn: q .* and k .* must agree"):
        blocked_top_k(q, torch.randn(1, 2, 6, 4), 2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_cpu_and_stays_on_the_device(dtype):
    x = synthetic_qkv("clustered", 2, 2, 300, 400, 32, seed=6, dtype=dtype)
    qc, kc = x.q.cuda(), x.k.cuda()
    with sync_debug_errors():  # any copy to the host (or other synchronisation) raises
        found = {}
        for causal, block in ((False, None), (True, None), (True, 32)):
            found[causal, block] = (
                blocked_top_k(qc, kc, 20, causal=causal, causal_block=block, key_block=64),
                ivf_top_k(qc, kc, 20, nprobe=10 ** 6, causal=causal, causal_block=block),
                ivf_top_k(qc, kc, 20, nprobe=8, causal=causal, causal_block=block))
    for (causal, block), results in found.items():
        for result in results:
            assert all(t.device == qc.device for t in result)
        values, indices = reference_top_k(x.q, x.k, 20, causal, block)
        for exact in results[:2]:  # blocked, and the IVF probing every chunk
            assert_same_top_k(type(exact)(*(t.cpu() for t in exact)), values, indices, atol=1e-4)
        cpu_ivf = ivf_top_k(x.q, x.k, 20, nprobe=8, causal=causal, causal_block=block)
        # CPU and CUDA draw different k-means subsamples from the same seed: same quality, not the same cells
        assert abs(recall(results[2].indices.cpu(), indices) - recall(cpu_ivf.indices, indices)) < 0.1
