import pytest
import torch

import common
from common.validation import check_int, check_qkv, check_choice


def qkv(nq=4, nk=5, d=3, dv=2, dtype=torch.float32):
    return torch.randn(1, 2, nq, d, dtype=dtype), torch.randn(1, 2, nk, d, dtype=dtype), torch.randn(1, 2, nk, dv, dtype=dtype)


def test_check_qkv_names_the_method_and_argument():
    # (every method refuses 20 bad inputs: tests/contract/test_reliability.py::test_bad_input_is_refused_naming_method_and_argument)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^mine: q must have shape \(B, H, N, D\)"):
        check_qkv(q[0], k, v, method="mine")
    with pytest.raises(ValueError, match="^mine: causal=True needs Nq <= Nk"):
        check_qkv(*qkv(nq=6, nk=5), causal=True, method="mine")
    with pytest.raises(ValueError, match="^mine: k contains non-finite"):
        check_qkv(q, k.index_fill(2, torch.tensor([1]), float("nan")), v, method="mine")
    check_qkv(q, k.index_fill(2, torch.tensor([1]), float("nan")), v, method="mine", check_finite=False)


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
