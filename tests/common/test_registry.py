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


def test_every_method_is_a_named_module_with_valid_budgets_and_exact_options():
    # (what the methods compute: tests/contract/test_contract.py)
    for name in common.available():
        cls = common.method_class(name)
        assert issubclass(cls, AttentionMethod) and cls.name == name
        for n in (1, 2, 32, 4096):
            budgets = cls.budgets(n)
            assert budgets and all(isinstance(b, dict) and set(b) <= set(cls.option_names()) for b in budgets)
            exact_options = cls.exact_options(n)
            assert exact_options is None or set(exact_options) <= set(cls.option_names())
        assert isinstance(common.get_attention(name, **cls.budgets(32)[0]), torch.nn.Module)


def test_policy_helpers():
    assert common.methods()[0] == "exact" and sorted(common.methods()) == common.available()
    assert all(common.method_class(n).supports_causal and common.method_class(n).trainable
               for n in common.methods(causal=True, trainable=True))
    assert common.method_options("exact", {}, seed=3) == {}
    assert common.method_options("uniform", {"num_samples": 2}, seed=3) == {"num_samples": 2, "seed": 3}
    assert common.method_options("uniform", {"seed": 1}, seed=3) == {"seed": 1}
    assert common.budget_options("uniform", 64, seed=5) == [{"num_samples": m, "seed": 5} for m in (4, 8, 32)]


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
