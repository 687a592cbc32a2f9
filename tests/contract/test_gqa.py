"""Grouped-query attention (issue 15; docs/DESIGN.md): ``enable_gqa=True`` with Hkv key/value heads dividing the
H query heads equals the same method on the key/value heads repeated (``repeat_interleave``, SDPA's definition),
for every registered method, causal and not; ``exact`` equals SDPA's own ``enable_gqa``."""
import pytest
import torch
import torch.nn.functional as F

import common

N, D, H, HKV = 24, 8, 4, 2


def _middle_budget(name):
    options = common.budget_options(name, N, seed=0)
    return options[len(options) // 2]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", common.available())
def test_gqa_equals_repeated_key_value_heads(name, causal):
    if causal and name not in common.methods(causal=True):
        pytest.skip(f"{name} does not run causal")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, H, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, HKV, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    options = _middle_budget(name)
    grouped = common.get_attention(name, **options)(q, k, v, causal=causal, enable_gqa=True)
    repeated = common.get_attention(name, **options)(q, k.repeat_interleave(H // HKV, 1),
                                                     v.repeat_interleave(H // HKV, 1), causal=causal)
    assert grouped.shape == (2, H, N, D)
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_gqa_is_sdpa_gqa(causal):
    q = torch.randn(1, 6, 10, 4, dtype=torch.float64)
    k, v = torch.randn(1, 3, 10, 4, dtype=torch.float64), torch.randn(1, 3, 10, 5, dtype=torch.float64)
    ours = common.get_attention("exact")(q, k, v, causal=causal, enable_gqa=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))


def test_gqa_refusals_name_the_argument():
    attn = common.get_attention("exact")
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match=r"^exact: enable_gqa=True needs .* H=4, Hkv=3"):
        attn(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match=r"^exact: batch and head dims must match"):
        attn(q, k, k)  # fewer key/value heads without enable_gqa: refused, never broadcast
    with pytest.raises(TypeError, match=r"^exact: enable_gqa must be a bool"):
        attn(q, q, q, enable_gqa=1)
