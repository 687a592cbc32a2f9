import pytest
import torch

import common
from common.attention import AttentionMethod
from common.registry import register


def test_exact_and_uniform_registered_and_sorted():
    names = common.available()
    assert "exact" in names and "uniform" in names
    assert names == sorted(names)


def test_unknown_method_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown attention method 'nope'; available: .*exact"):
        common.get_attention("nope")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"uniform: unknown option\(s\) 'bogus'; accepted: num_samples"):
        common.get_attention("uniform", bogus=3)


def test_every_method_is_a_module_with_budgets_and_the_contract_shape():
    x = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 5)
    for name in common.available():
        cls = common.method_class(name)
        assert issubclass(cls, AttentionMethod) and cls.name == name
        budgets = cls.budgets(32)
        assert budgets and all(isinstance(b, dict) for b in budgets)
        for options in budgets[:1]:
            attn = common.get_attention(name, **options)
            assert isinstance(attn, torch.nn.Module)
            with torch.no_grad():
                assert attn(*x).shape == (1, 2, 32, 5)


def test_name_clash_refused():
    with pytest.raises(ValueError, match="already taken"):
        @register("exact")
        class Other(AttentionMethod):
            pass


def test_inference_only_and_non_causal_methods_refuse_clearly():
    class NoCausal(AttentionMethod):
        name = "nocausal"
        supports_causal = False
        trainable = False

        def attend(self, q, k, v, causal, scale):
            return v[:, :, :q.shape[2]]

    q = torch.randn(1, 1, 3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="nocausal: causal=True is not supported"):
        NoCausal()(q.detach(), q.detach(), q.detach(), causal=True)
    with pytest.raises(RuntimeError, match="nocausal is inference-only"):
        NoCausal()(q, q, q)
