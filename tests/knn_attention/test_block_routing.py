"""knn's routed-block path, index='ivf_blocks' (knn_attention/block_routing.py, issue 13): exact when every key
block is read, the tail unbiased, error falling with the budget, causal masking, options, gradients, and (with CUDA)
the same under sync debug mode "error" on the GPU."""
import math

import pytest
import torch

import common
from common.data import synthetic_qkv
from knn_attention.block_routing import block_options, route, routed_attention
from knn_attention.forward_pass import LONG_N, KNNAttention

ALL = 10 ** 6  # nprobe covering every key block


def knn(**options):
    return common.get_attention("knn", index="ivf_blocks", **{"seed": 0, **options})


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("estimator", ["topk", "topk_uniform_tail"])
@pytest.mark.parametrize("nq,nk,block", [(48, 48, None), (37, 53, 8), (1, 20, 4), (64, 64, 64)])
def test_reading_every_block_is_exact(causal, estimator, nq, nk, block):
    x = synthetic_qkv("clustered", 2, 3, nq, nk, head_dim=8, value_dim=5, seed=1, dtype=torch.float64)
    out = knn(nprobe=ALL, estimator=estimator, cell_size=block, nlist=5)(x.q, x.k, x.v, causal=causal)
    torch.testing.assert_close(out, common.softmax_attention(x.q, x.k, x.v, causal=causal), rtol=1e-10, atol=1e-12)


def test_routing_is_static_and_draws_fall_outside_the_exact_keys():
    """Every query appears once; key ids lie in [-1, Nk); bias is 0 on exact keys and a finite log weight on every
    draw, which never repeats an exact key of its block."""
    x = synthetic_qkv("clustered", 1, 2, 100, head_dim=8, seed=0)
    opts = block_options(100, nlist=4, nprobe=3, block=8, num_samples=20)
    r = route(x.q, x.k, False, 8 ** -0.5, opts, torch.Generator().manual_seed(0))
    ids = r.query_ids.reshape(2, -1)
    assert torch.equal(ids[ids >= 0].view(2, -1).sort(-1).values, torch.arange(100).expand(2, 100))
    assert torch.equal(ids.gather(1, r.query_slot), torch.arange(100).expand(2, 100))
    exact, draws = r.key_ids[..., :24], r.key_ids[..., 24:44]
    assert ((r.key_ids >= -1) & (r.key_ids < 100)).all() and (r.key_ids[..., 44:] == -1).all()
    assert (r.bias[..., :24][exact >= 0] == 0).all() and torch.isinf(r.bias[..., :24][exact < 0]).all()
    assert (draws >= 0).all() and torch.isfinite(r.bias[..., 24:44]).all()
    assert not (draws.unsqueeze(-1) == exact.unsqueeze(-2)).any()


def test_flat_rows_draw_uniformly():
    """q = 0: the block-level softmax is proportional to the block sizes, so the proposal is uniform over the keys
    outside S_b and every draw weighs (keys outside S_b) / l, the weight of estimator (b)."""
    x = synthetic_qkv("clustered", 1, 1, 100, head_dim=8, seed=0)
    opts = block_options(100, nlist=4, nprobe=3, block=8, num_samples=20)
    r = route(torch.zeros_like(x.q), x.k, False, 8 ** -0.5, opts, torch.Generator().manual_seed(0))
    outside = 100 - (r.key_ids[..., :24] >= 0).sum(-1, keepdim=True)
    torch.testing.assert_close(r.bias[..., 24:44], (outside / 20).log().expand(-1, -1, 20).float())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "concentrated"])
def test_tail_estimator_is_unbiased(kind):
    """The routing is the same at every call (k-means seeded by `seed`) and the tail draws differ, so the mean of
    many calls converges to E[N] / E[D] = exact attention, up to the ratio's O(1/l) bias: far closer than one call
    and than estimator (a), which drops the mass outside S_b. Flat rows (q = 0: uniform draws) and concentrated
    rows (clustered keys, one key block read: the draws follow the block-level softmax, weights its inverse)."""
    x = synthetic_qkv("clustered", 1, 1, 96, head_dim=8, seed=2, dtype=torch.float64)
    q = torch.zeros_like(x.q) if kind == "flat" else x.q
    ref = common.softmax_attention(q, x.k, x.v)
    options = dict(nprobe=1 if kind == "concentrated" else 2, cell_size=8, nlist=4)
    attn = knn(num_samples=32, **options)
    runs = torch.stack([attn(q, x.k, x.v) for _ in range(150)])
    one, mean = rel_err(runs[0], ref), rel_err(runs.mean(0), ref)
    biased = rel_err(knn(estimator="topk", **options)(q, x.k, x.v), ref)
    assert mean < 0.2 * one and mean < 0.2 * biased, (mean, one, biased)


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_with_the_budget(causal):
    x = synthetic_qkv("clustered", 1, 2, 512, head_dim=16, seed=3)
    ref = common.softmax_attention(x.q, x.k, x.v, causal=causal)
    errs = [sum(rel_err(knn(nprobe=p, cell_size=16, nlist=16, estimator="topk", seed=s)(x.q, x.k, x.v,
                                                                                        causal=causal), ref)
                for s in range(3)) / 3 for p in (1, 4, 12)]
    assert errs[0] > errs[1] > errs[2], errs


def test_causal_never_reads_future_values():
    """Routing depends on q and k only, so overwriting future values with huge numbers changes no output row
    (every future key is masked to -inf, its weight exactly 0)."""
    x = synthetic_qkv("clustered", 1, 2, 80, head_dim=8, seed=4, dtype=torch.float64)
    out = knn(nprobe=3, cell_size=8, nlist=4, num_samples=16)(x.q, x.k, x.v, causal=True)
    for cut in (1, 30, 79):
        v = x.v.clone()
        v[:, :, cut:] = 1e30
        got = knn(nprobe=3, cell_size=8, nlist=4, num_samples=16)(x.q, x.k, v, causal=True)
        torch.testing.assert_close(got[:, :, :cut], out[:, :, :cut], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_keeps_its_dtype_and_tracks_float32(dtype, causal):
    x = synthetic_qkv("clustered", 1, 2, 200, head_dim=16, seed=5)
    ref = common.softmax_attention(x.q, x.k, x.v, causal=causal)
    full = knn(nprobe=ALL)(*(t.to(dtype) for t in (x.q, x.k, x.v)), causal=causal)
    assert full.dtype == dtype
    assert rel_err(full.float(), ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_of_the_routed_attention(causal):
    """Autograd differentiates the attention with the routing (cells, blocks, draws and their weights) held
    fixed: gradcheck in float64 of routed_attention for one routing, and the method's gradient is that one."""
    x = synthetic_qkv("clustered", 1, 1, 24, head_dim=4, value_dim=3, seed=6, dtype=torch.float64)
    opts = block_options(24, nlist=3, nprobe=2, block=4, num_samples=5)
    routing = route(x.q, x.k, causal, 0.5, opts, torch.Generator().manual_seed(0))
    inputs = tuple(t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda q, k, v: routed_attention(q, k, v, causal, 0.5, routing), inputs)
    attn, g = knn(nprobe=2, cell_size=4, nlist=3, num_samples=5), torch.randn(1, 1, 24, 3, dtype=torch.float64)
    attn(*inputs, causal=causal, scale=0.5).backward(g)
    ref = tuple(t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v))
    attn.reseed(0)
    again = route(x.q, x.k, causal, 0.5, opts, attn.generator("cpu"), torch.Generator().manual_seed(0))
    routed_attention(*ref, causal, 0.5, again).backward(g)
    for got, want in zip(inputs, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_bad_options_are_refused():
    for bad, match in ((dict(k=4), "nprobe"), (dict(estimator="gumbel", gradient="sampled"), "per-query"),
                       (dict(estimator="adaptive"), "per-query"), (dict(gradient="sampled"), "per-query"),
                       (dict(cell_size=0), "cell_size"), (dict(nprobe=0), "nprobe"), (dict(nlist=0), "nlist")):
        with pytest.raises(ValueError, match=match):
            q = torch.randn(1, 1, 8, 4)
            knn(**bad)(q, q, q)


def test_long_n_budgets_route_blocks_and_grow():
    budgets = KNNAttention.budgets(LONG_N)
    assert [b["index"] for b in budgets] == ["ivf_blocks"] * 3
    assert budgets[0]["nprobe"] < budgets[1]["nprobe"] < budgets[2]["nprobe"]
    assert all("index" not in b for b in KNNAttention.budgets(LONG_N - 1))
