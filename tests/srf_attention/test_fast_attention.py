"""FastAttention in train mode, the registered `srf` / `performer`: checked against an explicit quadratic form of
the same features, against exact softmax attention (statistically), by gradcheck, and on hostile inputs."""
import math

import pytest
import torch

import common
from common.metrics import relative_frobenius_error
from common.data import synthetic_qkv
from srf_attention.performer import PerformerAttention
from srf_attention.fast_attention import FastAttention, SRFAttention


def quadratic_reference(projection, q, k, v, causal, scale):
    """phi(q_i).phi(k_j) without any stabiliser, masked and normalised explicitly (float64)."""
    w = projection.double()
    phi = lambda x: torch.exp(math.sqrt(scale) * x @ w.T - scale * (x * x).sum(-1, keepdim=True) / 2)
    scores = phi(q) @ phi(k).transpose(-2, -1)
    if causal:
        scores = scores * common.causal_mask(q.shape[2], k.shape[2])
    return (scores / scores.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(37, 37), (10, 37)])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
@pytest.mark.parametrize("feature_type", ["simplex", "orthogonal", "iid"])
def test_train_mode_equals_quadratic_form_of_its_features(causal, nq, nk, chunk_size, feature_type):
    x = synthetic_qkv("gaussian", 2, 3, nq, nk, 8, value_dim=5, dtype=torch.float64, seed=1)
    fast = FastAttention(8, 12, causal=causal, feature_type=feature_type, chunk_size=chunk_size, seed=0)
    out = fast(x.q, x.k, x.v, scale=0.3)
    torch.testing.assert_close(out, quadratic_reference(fast.projection, x.q, x.k, x.v, causal, 0.3),
                               rtol=1e-10, atol=1e-10)


def test_noncausal_equals_causal_at_the_last_position():
    x = synthetic_qkv("gaussian", 1, 2, 40, 40, 16, dtype=torch.float64, seed=2)
    causal = FastAttention(16, 32, causal=True, chunk_size=16, seed=3)(x.q, x.k, x.v)
    full = FastAttention(16, 32, causal=False, seed=3)(x.q, x.k, x.v)
    torch.testing.assert_close(causal[:, :, -1], full[:, :, -1], rtol=1e-12, atol=1e-12)
    assert (causal[:, :, 0] - full[:, :, 0]).abs().max() > 1e-3  # and the mask does something elsewhere


@pytest.mark.parametrize("feature_type", ["simplex", "orthogonal", "iid"])
def test_kernel_estimate_is_unbiased(feature_type):
    """E[phi(q).phi(k)] = exp(S q.k) (Reid et al. eq. 1, Performer Lemma 1). The projection stacks 3000 independent blocks of d
    rows; the block means are i.i.d. estimates, and their mean is within 4 standard errors of the exact kernel."""
    gen = torch.Generator().manual_seed(0)
    d, blocks, scale = 6, 3000, 1 / math.sqrt(6)
    q = torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.8
    k = torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.8
    w = FastAttention(d, d * blocks, feature_type=feature_type, seed=1).projection.double()
    phi = lambda x: torch.exp(math.sqrt(scale) * x @ w.T - scale * (x * x).sum(-1, keepdim=True) / 2)
    estimates = (phi(q) * phi(k)).view(4, blocks, d).mean(-1)  # one estimate per block of d features
    exact = torch.exp(scale * (q * k).sum(-1))
    stderr = estimates.std(1) / math.sqrt(blocks)
    assert ((estimates.mean(1) - exact).abs() < 4 * stderr).all(), (estimates.mean(1), exact, stderr)


def test_attention_approaches_exact_as_features_grow():
    """Mean relative error over 4 seeds falls with m (by more than 4x from m = 16 to 4096, sqrt(256) = 16 being
    the Monte Carlo rate of the kernel entries) and is below 6% at m = 4096, on inputs of norm ~2 (|x'|^2 ~ 1)."""
    x = synthetic_qkv("gaussian", 1, 2, 64, 64, 16, dtype=torch.float64, seed=4)
    q, k = 0.5 * x.q, 0.5 * x.k
    exact = common.softmax_attention(q, k, x.v, causal=True)
    errors = {}
    for m in (16, 256, 4096):
        errs = [relative_frobenius_error(common.get_attention("srf", nb_features=m, seed=s)(q, k, x.v, causal=True),
                                         exact) for s in range(4)]
        errors[m] = sum(errs) / len(errs)
    assert errors[16] > errors[256] > errors[4096] and errors[4096] < 0.06 and errors[16] > 4 * errors[4096], errors


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    x = synthetic_qkv("gaussian", 1, 2, 7, 7, 4, value_dim=3, dtype=torch.float64, seed=5)
    fast = FastAttention(4, 6, causal=causal, chunk_size=3, seed=0)
    inputs = tuple(t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda q, k, v: fast(q, k, v), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["srf", "performer"])
def test_large_norms_stay_finite(dtype, name):
    """|q|, |k| ~ 30 (scores spread over hundreds): exp would overflow without the stabiliser."""
    x = synthetic_qkv("gaussian", 1, 2, 128, 128, 64, seed=6)
    q, k = (30 * t / t.norm(dim=-1, keepdim=True) for t in (x.q, x.k))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, x.v))
    attn = common.get_attention(name, nb_features=64, seed=0)
    for causal in (False, True):
        out = attn(q, k, v, causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        # each output row is a convex combination of value rows (or zero where every feature underflowed)
        assert (out.float() <= v.float().max() + 1e-2).all() and (out.float() >= v.float().min() - 1e-2).all()
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float32_with_the_same_features(causal, dtype):
    """bfloat16 runs natively (features and chunk products in bfloat16, states in float32), float16 in float32:
    both return the input dtype and equal the float32 computation of the same module to half precision (1e-2
    relative Frobenius; measured 3.7e-3 for bfloat16, about its own output rounding, and 2e-4 for float16)."""
    x = synthetic_qkv("gaussian", 2, 2, 300, 300, 32, seed=5)
    fast = FastAttention(32, 64, causal=causal, seed=0)
    half = fast(x.q.to(dtype), x.k.to(dtype), x.v.to(dtype))
    full = fast(x.q.to(dtype).float(), x.k.to(dtype).float(), x.v.to(dtype).float())
    assert half.dtype == dtype
    assert relative_frobenius_error(half.float(), full) < 1e-2


def test_redraw():
    x = synthetic_qkv("gaussian", 1, 1, 16, 16, 8, seed=7)
    fast = FastAttention(8, 8, seed=0)
    first = fast.projection.clone()
    assert not torch.equal(fast.redraw_().projection, first)
    fast.redraw_on_call_(False)
    a, b = fast(x.q, x.k, x.v), fast(x.q, x.k, x.v)
    assert torch.equal(a, b)
    fast.redraw_on_call_(True)
    before = fast.projection.clone()
    fast(x.q, x.k, x.v)
    assert not torch.equal(fast.projection, before)
    fast.eval()  # evaluation keeps the features even with redraw on
    before = fast.projection.clone()
    fast(x.q, x.k, x.v)
    assert torch.equal(fast.projection, before)
    srf = common.get_attention("srf", nb_features=8, redraw=True, seed=0)
    assert not torch.equal(srf(x.q, x.k, x.v), srf(x.q, x.k, x.v))


def test_feature_types_and_checkpoint_round_trip():  # seed repeat: tests/contract
    x = synthetic_qkv("gaussian", 1, 2, 20, 20, 8, seed=8)
    a = common.get_attention("srf", seed=3)
    a(x.q, x.k, x.v, causal=True)
    assert isinstance(common.get_attention("performer"), PerformerAttention)
    perf = common.get_attention("performer", nb_features=8, seed=0)
    perf(x.q, x.k, x.v)
    w = perf.fast.projection.double()
    gram = w @ w.T
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # one ORF block: orthogonal rows
    fresh = SRFAttention(seed=99)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh(x.q, x.k, x.v), a(x.q, x.k, x.v))


def test_bad_inputs_are_named():
    x = synthetic_qkv("gaussian", 1, 1, 8, 8, 8, seed=9)
    with pytest.raises(ValueError, match="nb_features must be >= 1"):
        FastAttention(8, 0)
    with pytest.raises(ValueError, match="srf: nb_features must be >= 1"):
        common.get_attention("srf", nb_features=0)
    with pytest.raises(ValueError, match="unknown feature_type"):
        FastAttention(8, 8, feature_type="gaussian")
    with pytest.raises(ValueError, match="built with head_dim=4"):
        FastAttention(4, 8)(x.q, x.k, x.v)
    with pytest.raises(ValueError, match="unknown mode"):
        FastAttention(8, 8)(x.q, x.k, x.v, mode="infer")
    with pytest.raises(ValueError, match="unknown attn_fn for mode='train'"):
        FastAttention(8, 8)(x.q, x.k, x.v, attn_fn="parallel")
    with pytest.raises(RuntimeError, match=r"attn_fn='flash' is a Triton kernel for CUDA devices .*use attn_fn='torch'"):
        FastAttention(8, 8)(x.q, x.k, x.v, attn_fn="flash")
    with pytest.raises(RuntimeError, match="use attn_fn='torch'"):
        common.get_attention("srf", attn_fn="flash")(x.q, x.k, x.v)
    with pytest.raises(ValueError, match="srf: unknown attn_fn 'triton'"):
        common.get_attention("srf", attn_fn="triton")
    srf = common.get_attention("srf", nb_features=8)
    srf(x.q, x.k, x.v)
    with pytest.raises(ValueError, match="built for head dim 8"):
        srf(x.q[..., :4], x.k[..., :4], x.v)
    with pytest.raises(ValueError, match="non-finite"):
        srf(x.q * float("nan"), x.k, x.v)
