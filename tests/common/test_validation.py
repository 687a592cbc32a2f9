import pytest
import torch

import common
from common.validation import check_choice, check_int, check_masks, check_qkv


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


def test_check_masks_accepts_sdpa_broadcasting_and_refuses_the_rest():
    # (every method: tests/contract/test_masks.py::test_mask_refusals_name_the_argument)
    q, k = torch.randn(2, 4, 3, 5), torch.randn(2, 2, 6, 5)  # 4 query heads, 2 key/value heads (GQA)
    for shape in [(2, 4, 3, 6), (2, 1, 3, 6), (1, 4, 1, 6), (4, 3, 6), (3, 6), (3, 1), (6,), (1,), ()]:
        check_masks(q, k, attn_mask=torch.ones(shape, dtype=torch.bool), method="m")   # passes silently
    check_masks(q, k, attn_mask=torch.zeros(3, 6).fill_(float("-inf")), method="m")  # -inf is a masked entry
    check_masks(q, k, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool), return_lse=True, method="m")
    for shape in [(2, 2, 3, 6), (3, 2, 3, 6), (2, 6), (1, 2, 4, 3, 6)]:  # H is the query heads, not Hkv
        with pytest.raises(ValueError, match=r"^m: attn_mask must be broadcastable to \(B, H, Nq, Nk\) = "
                                             r"\(2, 4, 3, 6\)"):
            check_masks(q, k, attn_mask=torch.ones(shape, dtype=torch.bool), method="m")
    with pytest.raises(ValueError, match=r"^m: attn_mask \(additive\) contains nan or \+inf"):
        check_masks(q, k, attn_mask=torch.full((3, 6), float("inf")), method="m")
    with pytest.raises(TypeError, match=r"^m: attn_mask must be a bool tensor .* got dtype torch.float64"):
        check_masks(q, k, attn_mask=torch.zeros(3, 6, dtype=torch.float64), method="m")
    with pytest.raises(ValueError, match=r"^m: key_padding_mask must have shape \(B, Nk\) = \(2, 6\), "
                                         r"got \(2, 3\)"):
        check_masks(q, k, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool), method="m")
    with pytest.raises(TypeError, match=r"^m: key_padding_mask must be a bool tensor \(True = padded key\)"):
        check_masks(q, k, key_padding_mask=torch.zeros(2, 6), method="m")
    with pytest.raises(TypeError, match=r"^m: return_lse must be a bool"):
        check_masks(q, k, return_lse="yes", method="m")
