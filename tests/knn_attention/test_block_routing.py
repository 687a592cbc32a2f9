"""knn's routed-block path, index='ivf_blocks' (knn_attention/block_routing.py, issue 13): exact when every key
block is read, the tail unbiased, error falling with the budget, causal masking, options, gradients, and (with CUDA)
the same under sync debug mode "error" on the GPU."""
import math
import warnings

import pytest
import torch

import common
from common.data import synthetic_qkv
from knn_attention.block_routing import attention_lse, block_options, route, routed_attention
from knn_attention.forward_pass import LONG_N, KNNAttention

ALL = 10 ** 6  # nprobe covering every key block


def knn(**options):
    return common.get_attention("knn", index="ivf_blocks", **{"seed": 0, **options})


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# (causal, layout options): non-causal, and causal in both layouts (the segments shorter than the inputs)
MODES = [(False, {}), (True, {"causal_layout": "mask"}), (True, {"causal_block": 16})]


def _mode_id(mode):
    causal, options = mode
    return "full" if not causal else "mask" if options.get("causal_layout") == "mask" else "segments"


@pytest.mark.parametrize("mode", MODES + [(True, {"causal_block": 5})], ids=_mode_id)
@pytest.mark.parametrize("estimator", ["topk", "topk_uniform_tail"])
@pytest.mark.parametrize("nq,nk,block", [(48, 48, None), (37, 53, 8), (1, 20, 4), (64, 64, 64)])
def test_reading_every_block_is_exact(mode, estimator, nq, nk, block):
    causal, layout = mode
    x = synthetic_qkv("clustered", 2, 3, nq, nk, head_dim=8, value_dim=5, seed=1, dtype=torch.float64)
    out = knn(nprobe=ALL, estimator=estimator, cell_size=block, nlist=5, **layout)(x.q, x.k, x.v, causal=causal)
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
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["flat", "concentrated"])
def test_tail_estimator_is_unbiased(kind, causal):
    """The routing is the same at every call (k-means seeded by `seed`) and the tail draws differ, so the mean of
    many calls converges to E[N] / E[D] = exact attention, up to the ratio's O(1/l) bias: far closer than one call
    and than estimator (a), which drops the mass outside S_b. Flat rows (q = 0: uniform draws) and concentrated
    rows (clustered keys, one key block read: the draws follow the block-level softmax, weights its inverse);
    causal in the segments layout (segments of 24: the routed part and its draws cover the earlier segments)."""
    x = synthetic_qkv("clustered", 1, 1, 96, head_dim=8, seed=2, dtype=torch.float64)
    q = torch.zeros_like(x.q) if kind == "flat" else x.q
    ref = common.softmax_attention(q, x.k, x.v, causal=causal)
    options = dict(nprobe=1 if kind == "concentrated" else 2, cell_size=8, nlist=4,
                   **({"causal_block": 24} if causal else {}))
    attn = knn(num_samples=32, **options)
    runs = torch.stack([attn(q, x.k, x.v, causal=causal) for _ in range(150)])
    one, mean = rel_err(runs[0], ref), rel_err(runs.mean(0), ref)
    biased = rel_err(knn(estimator="topk", **options)(q, x.k, x.v, causal=causal), ref)
    assert mean < 0.2 * one and mean < 0.2 * biased, (mean, one, biased)


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_error_falls_with_the_budget(mode):
    causal, layout = mode
    layout = {**layout, "causal_block": 128} if "causal_block" in layout else layout
    x = synthetic_qkv("clustered", 1, 2, 512, head_dim=16, seed=3)
    ref = common.softmax_attention(x.q, x.k, x.v, causal=causal)
    errs = [sum(rel_err(knn(nprobe=p, cell_size=16, nlist=16, estimator="topk", seed=s, **layout)(
                    x.q, x.k, x.v, causal=causal), ref)
                for s in range(3)) / 3 for p in (1, 4, 12)]
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("mode", MODES[1:], ids=_mode_id)
def test_causal_never_reads_future_values(mode):
    """Routing depends on q and k only, so overwriting future values with huge numbers changes no output row
    (every future key is masked to -inf, its weight exactly 0; in the segments layout no routed key lies in or
    after the query's segment, and the own segment's causal tile reads none after the query)."""
    layout = mode[1]
    x = synthetic_qkv("clustered", 1, 2, 80, head_dim=8, seed=4, dtype=torch.float64)
    out = knn(nprobe=3, cell_size=8, nlist=4, num_samples=16, **layout)(x.q, x.k, x.v, causal=True)
    for cut in (1, 30, 79):
        v = x.v.clone()
        v[:, :, cut:] = 1e30
        got = knn(nprobe=3, cell_size=8, nlist=4, num_samples=16, **layout)(x.q, x.k, v, causal=True)
        torch.testing.assert_close(got[:, :, :cut], out[:, :, :cut], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_half_precision_keeps_its_dtype_and_tracks_float32(dtype, mode):
    causal, layout = mode
    x = synthetic_qkv("clustered", 1, 2, 200, head_dim=16, seed=5)
    ref = common.softmax_attention(x.q, x.k, x.v, causal=causal)
    full = knn(nprobe=ALL, **layout)(*(t.to(dtype) for t in (x.q, x.k, x.v)), causal=causal)
    assert full.dtype == dtype
    assert rel_err(full.float(), ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_gradients_of_the_routed_attention(mode):
    """Autograd differentiates the attention with the routing (cells, blocks, draws and their weights) held
    fixed: gradcheck in float64 of routed_attention for one routing, and the method's gradient is that one (in
    the segments layout through the tiled log-sum-exps of both parts and their merge)."""
    causal, layout = mode
    layout = {**layout, "causal_block": 8} if "causal_block" in layout else layout
    x = synthetic_qkv("clustered", 1, 1, 24, head_dim=4, value_dim=3, seed=6, dtype=torch.float64)
    opts = block_options(24, nlist=3, nprobe=2, block=4, num_samples=5, segment=layout.get("causal_block"),
                         causal_layout=layout.get("causal_layout", "segments"))
    routing = route(x.q, x.k, causal, 0.5, opts, torch.Generator().manual_seed(0))
    inputs = tuple(t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda q, k, v: routed_attention(q, k, v, causal, 0.5, routing), inputs)
    attn = knn(nprobe=2, cell_size=4, nlist=3, num_samples=5, **layout)
    g = torch.randn(1, 1, 24, 3, dtype=torch.float64)
    attn(*inputs, causal=causal, scale=0.5).backward(g)
    ref = tuple(t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v))
    attn.reseed(0)
    again = route(x.q, x.k, causal, 0.5, opts, attn.generator("cpu"), torch.Generator().manual_seed(0))
    routed_attention(*ref, causal, 0.5, again).backward(g)
    for got, want in zip(inputs, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,dv", [(16, 16, 8), (5, 21, 3)])
def test_kernel_log_sum_exp_equals_the_tiled_reference(causal, nq, nk, dv):
    """attention_lse without autograd (the fused kernel's own lse, here the CPU flash kernel) equals common's tiled
    attention_with_lse (used under autograd), out and lse, with value and head sizes that need padding."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, nq, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, nk, 6, generator=g,
                                                                                    dtype=torch.float64)
    v = torch.randn(2, 3, nk, dv, generator=g, dtype=torch.float64)
    if causal:
        q, k, v = q[:, :, :nq], k[:, :, :nq], v[:, :, :nq]
    with warnings.catch_warnings():  # a fallback to attention_with_lse (it warns) would compare it with itself
        warnings.filterwarnings("error", message="knn: ivf_blocks could not take the log-sum-exp")
        out, lse = attention_lse(q, k, v, 0.4, causal)
    want_out, want_lse = common.attention_with_lse(q, k, v, 0.4, causal)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


def test_segments_layout_without_autograd_equals_it_with_autograd():
    """The segments layout's fast path (kernel lse, no autograd) and its differentiable path (tiled lse) give the
    same output: one estimator, two evaluations; decoding (Nq < Nk) included."""
    x = synthetic_qkv("clustered", 1, 2, 70, 90, head_dim=8, seed=7, dtype=torch.float64)
    for nq in (70, 1):
        q = x.q[:, :, -nq:]
        with torch.no_grad():
            fast = knn(nprobe=2, cell_size=8, nlist=4, num_samples=8, causal_block=16)(q, x.k, x.v, causal=True)
        slow = knn(nprobe=2, cell_size=8, nlist=4, num_samples=8, causal_block=16)(
            q.clone().requires_grad_(), x.k, x.v, causal=True)
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-12)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="causal_layout"):
        common.get_attention("knn", index="torch", causal_layout="mask")
    for bad, match in ((dict(k=4), "nprobe"), (dict(estimator="gumbel", gradient="sampled"), "per-query"),
                       (dict(causal_layout="diagonal"), "causal_layout"),
                       (dict(causal_layout="mask", causal_block=8), "causal_block"),
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


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_importable(), reason="triton is not importable")
def test_triton_path_equals_the_sdpa_path_under_the_interpreter():
    """Non-causal without autograd, the routed attention reads keys through common.indexed_attention's Triton kernel
    (no gathered copy); under the interpreter (CPU tensors) it equals the differentiable SDPA path for one routing,
    float32 / bfloat16 / float16, Dv != D, padded query blocks."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "common"))
    from test_indexed_attention import run_under_interpreter
    errors = run_under_interpreter("""
        import json, torch, warnings
        from common.data import synthetic_qkv
        from common.indexed_attention import triton_supports
        from knn_attention.block_routing import block_options, route, routed_attention
        # the kernel's fallback to the SDPA path (it warns) would compare that path with itself
        warnings.filterwarnings("error", message="knn: ivf_blocks could not use the Triton")
        errors = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = synthetic_qkv("clustered", 1, 2, 200, head_dim=16, value_dim=32, seed=0)
            q, k, v = (t.to(dtype) for t in (x.q, x.k, x.v))
            r = route(q, k, False, 0.25, block_options(200, nlist=4, nprobe=2, block=16, num_samples=20),
                      torch.Generator().manual_seed(0))
            assert triton_supports(q, k, v) is None, triton_supports(q, k, v)
            with torch.no_grad():
                fast = routed_attention(q, k, v, False, 0.25, r)
            ref = routed_attention(q.clone().requires_grad_(), k, v, False, 0.25, r).detach()
            errors[str(dtype)] = [((fast.float() - ref.float()).norm() / ref.float().norm()).item(), str(fast.dtype)]
        print(json.dumps(errors))
    """)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2), ("float16", 2e-3)):
        error, got = errors[f"torch.{dtype}"]
        assert got == f"torch.{dtype}" and error < tol, (dtype, error)
