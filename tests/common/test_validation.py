import pytest
import torch

import common
from common.validation import check_int, check_qkv, check_choice


def qkv(nq=4, nk=5, d=3, dv=2, dtype=torch.float32):
    return torch.randn(1, 2, nq, d, dtype=dtype), torch.randn(1, 2, nk, d, dtype=dtype), torch.randn(1, 2, nk, dv, dtype=dtype)


@pytest.mark.parametrize("mutate,message", [
    (lambda q, k, v: (q[0], k, v), r"q must have shape \(B, H, N, D\)"),
    (lambda q, k, v: (q, k.double(), v), "share one dtype"),
    (lambda q, k, v: (q.long(), k, v), "floating-point"),
    (lambda q, k, v: (q, k[:, :1], v), "batch and head dims"),
    (lambda q, k, v: (q, k[..., :2], v), "same head dim"),
    (lambda q, k, v: (q, k, v[:, :, :3]), "same sequence length"),
    (lambda q, k, v: (q[:, :, :0], k, v), "empty sequence"),
    (lambda q, k, v: (q, k.index_fill(2, torch.tensor([1]), float("nan")), v), "k contains non-finite"),
    (lambda q, k, v: (q, k, v.index_fill(2, torch.tensor([0]), float("inf"))), "v contains non-finite"),
    (lambda q, k, v: ("q", k, v), "must be a torch.Tensor"),
])
def test_bad_inputs_are_named(mutate, message):
    q, k, v = mutate(*qkv())
    for method in ("exact", "uniform"):
        with pytest.raises((ValueError, TypeError), match=message):
            common.get_attention(method)(q, k, v)


def test_causal_needs_nq_le_nk_and_scale_checked():
    q, k, v = qkv(nq=6, nk=5)
    with pytest.raises(ValueError, match="causal=True needs Nq <= Nk"):
        common.get_attention("exact")(q, k, v, causal=True)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a positive"):
        common.get_attention("exact")(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="scale must be a positive float"):
        common.get_attention("exact")(q, k, v, scale="1")


def test_finite_check_can_be_switched_off():
    q, k, v = qkv()
    k[0, 0, 0, 0] = float("nan")
    out = common.get_attention("exact", check_finite=False)(q, k, v)
    assert torch.isnan(out).any()


def test_int_and_choice_helpers():
    assert check_int(3, "k", "m", minimum=1) == 3
    with pytest.raises(ValueError, match="m: k must be >= 1, got 0"):
        check_int(0, "k", "m", minimum=1)
    with pytest.raises(TypeError, match="k must be an int"):
        check_int(True, "k", "m")
    with pytest.raises(ValueError, match="unknown index 'x'"):
        check_choice("x", "index", "m", ("flat", "ivf"))
    check_qkv(*qkv(), causal=True)  # valid input passes silently
