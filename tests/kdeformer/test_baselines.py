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


# --- reformer, issue 17: half precision, budgets larger than the keys (causal prefixes, empty batches, odd shapes
# and exact options: tests/contract) ----------------------------------------------------------------------------

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
