"""Reformer and ScatterBrain: exact in their limits, causal, errors."""
import warnings

import pytest
import torch

import common
from common.data import synthetic_qkv


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_one_chunk_is_exact(causal):
    x = synthetic_qkv("gaussian", 2, 2, 48, 48, 8, dtype=torch.float64)
    for n_hashes in (1, 3):
        out = common.get_attention("reformer", bucket_size=48, n_hashes=n_hashes, seed=0)(x.q, x.k, x.v, causal=causal)
        assert (out - common.softmax_attention(x.q, x.k, x.v, causal=causal)).abs().max().item() < 1e-10


def test_reformer_shared_qk_finds_the_planted_key_and_rounds_help():
    x = synthetic_qkv("planted", 1, 2, 256, 256, 32, dtype=torch.float64)
    exact = common.softmax_attention(x.q, x.k, x.v)
    err = lambda r: sum((common.get_attention("reformer", bucket_size=32, n_hashes=r, seed=s)(x.q, x.k, x.v)
                         - exact).abs().mean().item() for s in range(3))
    assert err(4) < err(1)
    assert err(4) / 3 < 0.2


def test_reformer_causal_never_reads_future():
    # As in Kitaev et al. (2020), buckets are sorted over the whole sequence, so which *past* keys share a chunk
    # with query i depends on the hashes of future keys too: outputs move when future keys change. What the
    # causal mask guarantees, and this test checks, is that no future value reaches an earlier output.
    x = synthetic_qkv("gaussian", 1, 2, 64, 64, 8, dtype=torch.float64)
    k2, v2 = x.k.clone(), x.v.clone()
    k2[:, :, 30:] = -x.k[:, :, 30:]
    v2[:, :, 30:] = 1e4
    out2 = common.get_attention("reformer", bucket_size=8, seed=2)(x.q, k2, v2, causal=True)
    assert out2[:, :, :30].abs().max() < 100


# --- reformer, issue 17: empty batches, half precision, odd shapes, budgets larger than the keys, exact options ----

@pytest.mark.parametrize("b,h", [(0, 2), (2, 0)])
def test_reformer_empty_batch_reaches_no_reshape_of_zero_elements(b, h):
    # regression: lsh_round's view(b, h, -1, dv) raised "cannot reshape tensor of 0 elements"
    from kdeformer.reformer import lsh_round
    q, k, v = torch.randn(b, h, 9, 4), torch.randn(b, h, 12, 4), torch.randn(b, h, 12, 3)
    for causal in (False, True):
        assert lsh_round(q, k, v, 0.5, 4, 4, causal, torch.Generator().manual_seed(0)).num.shape == (b, h, 9, 3)
        attn = common.get_attention("reformer", bucket_size=4, n_hashes=2, seed=0)
        assert attn.attend(q, k, v, causal, 0.5).shape == (b, h, 9, 3)
        assert attn(q, k, v, causal=causal).shape == (b, h, 9, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_reformer_half_precision_is_the_float32_computation_and_finite_at_scores_1e4(dtype, tol, causal):
    # logits, exponentials and sums in float32: equals the float32 call on the same rounded inputs up to the
    # output's rounding, at normal scale and with scores ~5e3 (bfloat16 logits would be off by up to 16 there)
    x = synthetic_qkv("clustered", 1, 2, 96, 96, 16)
    for s in (1.0, 25.0):
        q, k, v = (t.to(dtype) for t in (x.q * s, x.k * s, x.v))
        out = common.get_attention("reformer", bucket_size=16, n_hashes=2, seed=3)(q, k, v, causal=causal)
        ref = common.get_attention("reformer", bucket_size=16, n_hashes=2, seed=3)(
            q.float(), k.float(), v.float(), causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.filterwarnings("ignore:reformer. bucket_size=4 is larger")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4, 4), (1, 2, 2, 2, 4, 4), (2, 2, 37, 37, 1, 3), (1, 1, 1, 50, 128, 7),
                                   (1, 2, 13, 50, 8, 8)])
def test_reformer_odd_shapes_are_exact_under_exact_options(shape, causal):
    # N = 1, 2, odd N, Nq = 1, Nq < Nk, D = 1 and 128, Dv != D; non-contiguous inputs (views of wider tensors)
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, c + 1, generator=g, dtype=torch.float64)[..., 1:]
               for n, c in ((nq, d), (nk, d), (nk, dv)))
    exact = common.softmax_attention(q, k, v, causal=causal)
    options = common.get_attention("reformer").exact_options(nk)
    out = common.get_attention("reformer", seed=0, **options)(q, k, v, causal=causal)
    assert (out - exact).abs().max().item() < 1e-10
    approx = common.get_attention("reformer", bucket_size=4, n_hashes=3, seed=0)(q, k, v, causal=causal)
    assert approx.shape == exact.shape and torch.isfinite(approx).all()


def test_reformer_bucket_larger_than_the_keys_clamps_exactly_and_warns_once():
    # regression: with Nk < bucket_size the chunk was padded to bucket_size; now clamped to Nk (exact), said once
    x = synthetic_qkv("gaussian", 1, 2, 6, 6, 8, dtype=torch.float64)
    attn = common.get_attention("reformer", bucket_size=64, n_hashes=2, seed=0)
    with pytest.warns(UserWarning, match="bucket_size=64 is larger than the number of keys Nk=6"):
        out = attn(x.q, x.k, x.v, causal=True)
    assert (out - common.softmax_attention(x.q, x.k, x.v, causal=True)).abs().max().item() < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(x.q[:, :, -1:], x.k, x.v, causal=True)
