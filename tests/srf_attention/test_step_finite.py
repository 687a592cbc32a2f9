"""srf's own step() keeps the contract's output check (docs/DESIGN.md: a non-finite output from finite inputs
raises NonFiniteError naming the method), which the base class's step would have given it."""
import pytest
import torch

import common
from srf_attention.fast_attention import FastAttention


def test_step_refuses_a_non_finite_output(monkeypatch):
    attn = common.get_attention("srf", nb_features=8, seed=0)
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    state = attn.init_state()
    assert torch.isfinite(attn.step(q, k, v, state)).all()
    real_generate = FastAttention.generate

    def poisoned(self, *args, **kwargs):
        out, *rest = real_generate(self, *args, **kwargs)
        return (out * float("nan"), *rest)

    monkeypatch.setattr(FastAttention, "generate", poisoned)
    with pytest.raises(common.NonFiniteError, match="srf"):
        attn.step(q, k, v, state)
    attn.check_finite = False  # the same switch that turns off the input check turns this one off
    assert torch.isnan(attn.step(q, k, v, state)).all()
