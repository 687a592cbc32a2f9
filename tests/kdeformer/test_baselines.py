"""Reformer (the KDEformer paper's LSH baseline): exact in its limits, shared-QK hashing, rounds; ScatterBrain is in test_scatterbrain.py."""

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
