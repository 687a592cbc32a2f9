"""KDEformer: LSH/Gray-code order, exact limits, unbiased residual, causal split never reads the future."""
import warnings

import pytest
import torch

import common
from common.data import synthetic_qkv
from kdeformer.kdeformer import kde_output, kde_partial, operator_norm, residual_probabilities
from kdeformer.lsh import bucket_positions, gray_code, gray_rank, random_projections


def test_gray_code_one_bit_property_and_inverse():
    i = torch.arange(2 ** 7)
    g = gray_code(i)
    diff = g[1:] ^ g[:-1]
    assert ((diff & (diff - 1)) == 0).all() and (diff > 0).all()  # exactly one bit differs
    assert torch.equal(gray_rank(g, 7), i)
    assert sorted(g.tolist()) == i.tolist()  # a permutation of all codes


def test_similar_vectors_share_buckets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 200, 16, generator=g, dtype=torch.float64)
    near = x + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = random_projections(16, 7, g, torch.float64, "cpu")
    same_near = (bucket_positions(x, w) == bucket_positions(near, w)).double().mean()
    same_far = (bucket_positions(x, w) == bucket_positions(x.roll(1, 2), w)).double().mean()
    assert same_near > 0.9 and same_far < 0.2


@pytest.mark.parametrize("nq,nk", [(50, 50), (37, 90)])
def test_one_block_is_exact(nq, nk):
    x = synthetic_qkv("gaussian", 2, 2, nq, nk, 8, dtype=torch.float64)
    out = common.get_attention("kdeformer", bucket_size=nk, sample_size=16, seed=0)(x.q, x.k, x.v)
    assert (out - common.softmax_attention(x.q, x.k, x.v)).abs().max().item() < 1e-10


def test_residual_estimate_unbiased_over_seeds():
    # numerator and normaliser are unbiased: the mean over seeds sits within a few standard errors of the exact
    # sums (|z| of an unbiased estimate is about half-normal: mean 0.8; a bias of even 1% shows as |z| >> 1)
    x = synthetic_qkv("gaussian", 1, 1, 20, 64, 8, dtype=torch.float64)
    s = 8 ** -0.5
    exact_num = torch.exp(x.q @ x.k.transpose(-1, -2) * s) @ x.v
    exact_den = torch.exp(x.q @ x.k.transpose(-1, -2) * s).sum(-1)
    calls, batch = 16, 50  # each call draws one LSH and, per batch row, its own residual samples
    runs = calls * batch
    nums, dens = [], []
    for seed in range(calls):
        p = kde_partial(*(t.expand(batch, -1, -1, -1) for t in (x.q, x.k, x.v)), s, 3, 16, 16,
                        torch.Generator().manual_seed(seed))
        nums.append(p.num * p.shift.exp().unsqueeze(-1))
        dens.append(p.den * p.shift.exp())
    for est, exact in ((torch.cat(nums), exact_num[0]), (torch.cat(dens), exact_den[0])):
        z = (est.mean(0) - exact) / (est.std(0) / runs ** 0.5)
        assert z.abs().mean() < 1.2 and z.abs().max() < 5


def test_error_falls_with_sample_size():
    x = synthetic_qkv("clustered", 1, 2, 256, 256, 16, dtype=torch.float64)
    exact = common.softmax_attention(x.q, x.k, x.v)
    err = lambda m: sum(((common.get_attention("kdeformer", bucket_size=32, sample_size=m, seed=s)(x.q, x.k, x.v)
                          - exact) ** 2).mean().item() for s in range(4))
    assert err(8) > 2 * err(256)


def test_residual_probabilities_normalised_and_follow_value_norms():
    v = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    v[0, 0, 0] = torch.tensor([3.0, 4.0])
    p = residual_probabilities(v)
    assert p.sum().item() == pytest.approx(1.0)
    # ||v_0|| / ||V||_op = 1, others 0: raw = (1 + 1/4, 1/4, 1/4, 1/4) -> p_0 = 1.25 / 2
    assert p[0, 0, 0].item() == pytest.approx(1.25 / 2, rel=1e-6)


@pytest.mark.parametrize("nq,nk", [(64, 64), (40, 64), (37, 37), (29, 50)])
def test_causal_never_reads_future_and_is_exact_at_full_budget(nq, nk):
    # (37, 37) and (29, 50): lengths that are no multiple of chunk_size (the last chunk is partial)
    x = synthetic_qkv("gaussian", 1, 2, nq, nk, 8, dtype=torch.float64)
    attn = lambda k, v, **o: common.get_attention("kdeformer", seed=1, **o)(x.q, k, v, causal=True)
    out = attn(x.k, x.v, bucket_size=8, sample_size=8, chunk_size=8)
    # tests/contract checks the future at N = 48 (whole chunks only): here the lengths with a partial last chunk
    for seen in ((1, 13, 20) if nk % 8 else ()):  # query seen - 1 sits at position cut - 1; keys from cut on are the future
        cut = nk - nq + seen
        k2, v2 = x.k.clone(), x.v.clone()
        k2[:, :, cut:] = 50.0
        v2[:, :, cut:] = 1e4
        out2 = attn(k2, v2, bucket_size=8, sample_size=8, chunk_size=8)
        torch.testing.assert_close(out[:, :, :seen], out2[:, :, :seen], rtol=1e-12, atol=1e-12)
        assert (out2[:, :, seen:] - out[:, :, seen:]).abs().max() > 1  # the future keys did change something
    # exact_options in tests/contract leave chunk_size = bucket_size = Nk (one chunk); here several chunks of 8
    full = attn(x.k, x.v, bucket_size=nk, sample_size=0, chunk_size=8)
    assert (full - common.softmax_attention(x.q, x.k, x.v, causal=True)).abs().max().item() < 1e-10


def test_bad_options():  # large scores stay finite: the reliability matrix (tests/contract)
    x = synthetic_qkv("gaussian", 1, 1, 128, 128, 16, sharpness=30.0)
    with pytest.raises(ValueError, match="bucket_size must be >= 1"):
        common.get_attention("kdeformer", bucket_size=0)
    with pytest.raises(ValueError, match="sample_size must be >= 0"):
        common.get_attention("kdeformer", sample_size=-1)
    with pytest.raises(ValueError, match="same head dim"):
        common.get_attention("kdeformer")(x.q, x.k[..., :8], x.v)


def test_fused_output_equals_the_partial_sums_and_is_a_convex_combination():
    x = synthetic_qkv("clustered", 2, 2, 70, 90, 8, dtype=torch.float64)
    for nq in (70, 5):  # fewer queries than blocks: most query rows of the blocks are padding
        q = x.q[:, :, :nq]
        fused = kde_output(q, x.k, x.v, 0.5, 7, 16, 24, torch.Generator().manual_seed(3))
        sums = kde_partial(q, x.k, x.v, 0.5, 7, 16, 24, torch.Generator().manual_seed(3)).output()
        torch.testing.assert_close(fused, sums, rtol=1e-10, atol=1e-10)
        # weights are positive: each output row lies inside the range of the value rows
        assert (fused <= x.v.amax(2, keepdim=True) + 1e-9).all() and (fused >= x.v.amin(2, keepdim=True) - 1e-9).all()


def test_operator_norm_by_power_iteration_is_a_close_lower_bound():
    v = synthetic_qkv("gaussian", 2, 3, 1, 200, 6, dtype=torch.float64).k
    exact = torch.linalg.matrix_norm(v, ord=2)
    for iterations, ratio in ((8, 0.9), (1000, 1 - 1e-4)):  # a Rayleigh quotient never exceeds the top eigenvalue
        est = operator_norm(v, iterations=iterations, generator=torch.Generator().manual_seed(0))
        assert (est <= exact * (1 + 1e-12)).all() and (est >= ratio * exact).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_flow_and_match_exact_at_full_budget(causal):
    x = synthetic_qkv("gaussian", 1, 2, 48, 48, 8, dtype=torch.float64)
    grads = {}
    for name, options in (("exact", {}), ("kdeformer", dict(bucket_size=48, sample_size=8, chunk_size=12, seed=0))):
        q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
        out = common.get_attention(name, **options)(q, k, v, causal=causal)
        grads[name] = torch.autograd.grad((out * x.v[..., :1, :]).sum(), (q, k, v))
    for g_kde, g_exact in zip(grads["kdeformer"], grads["exact"]):
        torch.testing.assert_close(g_kde, g_exact, rtol=1e-8, atol=1e-10)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    out = common.get_attention("kdeformer", bucket_size=8, sample_size=8, seed=0)(q, k, v, causal=causal)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


# --- issue 17, kdeformer and reformer: half precision, budgets larger than the keys (empty batches, odd shapes,
# exact options: tests/contract) ----------------------------------------------------------------------------------

LSH_METHODS = [("kdeformer", {"sample_size": 16}), ("reformer", {"n_hashes": 2})]


@pytest.mark.parametrize("name,options", LSH_METHODS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_is_the_float32_computation_and_finite_at_scores_1e4(name, options, dtype, tol, causal):
    # output dtype = input dtype; hashing, probabilities, logits and sums in float32: the half-precision call equals
    # the float32 call on the same rounded inputs up to the output's rounding, at normal scale and with scores ~5e3
    # (bfloat16 logits would be off by up to 16 there)
    x = synthetic_qkv("clustered", 1, 2, 96, 96, 16)
    for s in (1.0, 25.0):
        q, k, v = (t.to(dtype) for t in (x.q * s, x.k * s, x.v))
        if s > 1:
            assert (q.float() @ k.float().transpose(-1, -2)).abs().max() / 4 > 2e3
        out = common.get_attention(name, bucket_size=16, seed=3, **options)(q, k, v, causal=causal)
        ref = common.get_attention(name, bucket_size=16, seed=3, **options)(
            q.float(), k.float(), v.float(), causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("name,options", LSH_METHODS)
def test_bucket_larger_than_the_keys_clamps_exactly_and_warns_once(name, options):
    # decoding with a short prompt: Nk = 6 keys, bucket_size 64 -> one block of all keys (exact), one warning
    # (regression: the chunk was padded to bucket_size)
    x = synthetic_qkv("gaussian", 1, 2, 6, 6, 8, dtype=torch.float64)
    attn = common.get_attention(name, bucket_size=64, seed=0, **options)
    with pytest.warns(UserWarning, match="bucket_size=64 is larger than the number of keys Nk=6"):
        out = attn(x.q, x.k, x.v, causal=True)
    assert (out - common.softmax_attention(x.q, x.k, x.v, causal=True)).abs().max().item() < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(x.q[:, :, -1:], x.k, x.v, causal=True)  # said once per instance


def test_causal_error_falls_with_the_budget_in_one_fused_call():
    # issue 13: the single-call causal construction (diagonal chunks, LSH window, stratified samples) converges:
    # more residual samples, and a window covering the whole past, bring it to exact causal attention
    x = synthetic_qkv("clustered", 1, 2, 256, 256, 16, dtype=torch.float64)
    exact = common.softmax_attention(x.q, x.k, x.v, causal=True)
    err = lambda **o: sum(((common.get_attention("kdeformer", chunk_size=16, seed=s, **o)(x.q, x.k, x.v, causal=True)
                            - exact) ** 2).mean().item() for s in range(4))
    assert err(bucket_size=16, sample_size=8) > 2 * err(bucket_size=16, sample_size=512)
    assert err(bucket_size=256, sample_size=0) < 1e-24
