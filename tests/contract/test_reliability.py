"""The reliability matrix (issue 17): every registered method on the inputs a new user meets, under a time limit.

Each cell is (method, dtype, causal, shape) and runs the method at its middle declared budget for the cell's Nk
(``common.budget_options``, seeded), twice: at normal scale (Gaussian q, k: scores of order 1) and with q, k
scaled so that the largest |score| is 1e4. Both runs must return, within the time limit of conftest.py, a finite
output of shape (B, H, Nq, Dv) and of the input dtype, and its error must be within the method's own error on
the same input:

    err(out) <= ERROR_FACTOR * err(out64) + RESOLUTION_FACTOR * (eps(dtype) + eps(accumulation) * max|score|),

where out64 is the same method (same options) run in float64 on the very same input (the low-precision input
cast up, so both see identical numbers), err(x) = rms(x - exact) / rms(v) with exact the float64 reference on
that input, err(out64) the largest over seeds 0, 1, 2 for a randomised method (its error range on this input:
the low-precision run may draw other numbers than a float64 one, e.g. when random draws are made in the
accumulation dtype), and eps a dtype's machine epsilon. The first term allows a method's own approximation error,
made at most twice as large by rounding (a data-dependent choice such as a top-k or an LSH bucket may flip on a
rounded input); the second allows rounding: the output's own (eps of the input dtype), and that of the scores,
which are computed in the accumulation dtype (float32 for float32 and half inputs, docs/DESIGN.md; float64 for
float64) with an absolute error of about eps * |score| that the softmax passes on to its weights (softmax is
conditioned like exp: a score error delta moves a weight by a factor e^delta). For float64 cells the bound holds
with equality.

A cell that fails today is listed in KNOWN_FAILURES with its reason: it runs as a strict xfail, so that it
turns into an error as soon as it is fixed (then delete its entry).
Then BAD_INPUTS: inputs every method must refuse with a clear error naming the method and what was wrong.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import common

from .conftest import VARIANTS, random_qkv

# Every registered method at its middle budget, plus the variants of conftest.VARIANTS.
METHODS = common.available() + list(VARIANTS)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name: (B, H, Nq, Nk, D, Dv, contiguous)
SHAPES = {
    "B0": (0, 2, 5, 5, 8, 8, True),
    "N1": (1, 2, 1, 1, 8, 8, True),
    "N2": (2, 1, 2, 2, 8, 8, True),
    "oddN": (2, 2, 13, 13, 8, 8, True),
    "Nq1": (1, 2, 1, 17, 8, 8, True),
    "NqltNk": (1, 2, 9, 24, 8, 8, True),
    "D1": (1, 2, 16, 16, 1, 1, True),
    "D128": (1, 2, 16, 16, 128, 128, True),
    "DvneD": (1, 2, 16, 16, 8, 3, True),
    "strided": (2, 2, 16, 16, 8, 8, False),
}
SCALES = {"normal": None, "scores1e4": 1e4}
ERROR_FACTOR = 2.0
REFERENCE_SEEDS = (0, 1, 2)
RESOLUTION_FACTOR = 16.0

CASES = [f"{dtype}-{'causal' if causal else 'full'}-{shape}"
         for dtype, causal, shape in itertools.product(DTYPES, (False, True), SHAPES)]

# (method, case) -> why it fails today. Strict xfails: a fixed cell fails until its entry is removed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _cells():
    for method, case in itertools.product(METHODS, CASES):
        reason = KNOWN_FAILURES.get((method, case))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(method, case, marks=marks, id=f"{method}-{case}")


def rms_error(out: torch.Tensor, exact: torch.Tensor, v: torch.Tensor) -> float:
    """Root-mean-square error of ``out`` against ``exact``, relative to the rms of the values (a scale that is
    never near zero, unlike the exact output of a nearly flat softmax)."""
    return ((out.double() - exact).pow(2).mean().sqrt() / v.double().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("method,case", list(_cells()))
def test_cell(method, case):
    dtype_name, mode, shape = case.split("-")
    dtype, causal = DTYPES[dtype_name], mode == "causal"
    b, h, nq, nk, d, dv, contiguous = SHAPES[shape]
    name, extra = VARIANTS.get(method, (method, {}))
    budgets = common.budget_options(name, nk, seed=0)
    options = {**budgets[len(budgets) // 2], **extra}
    for scale_name, score_scale in SCALES.items():
        q, k, v = random_qkv(b, h, nq, nk, d, dv, seed=1, max_score=score_scale, dtype=dtype, contiguous=contiguous)
        assert q.is_contiguous() == contiguous and v.is_contiguous() == contiguous
        with torch.no_grad():
            out = common.get_attention(name, **options)(q, k, v, causal=causal)
        where = f"{name} {options} on {case}, {scale_name}"
        assert out.shape == (b, h, nq, dv), where
        assert out.dtype == dtype and out.device == q.device, where
        assert torch.isfinite(out).all(), f"{where}: non-finite output"
        if b == 0:
            continue
        q64, k64, v64 = (t.double() for t in (q, k, v))
        exact = common.softmax_attention(q64, k64, v64, causal=causal)
        err = rms_error(out, exact, v64)
        err64 = err
        if dtype != torch.float64:
            # the method's own error on this input: the largest over a few seeds of its float64 runs (a float64
            # run draws other random numbers than a float32 one when a method draws in its accumulation dtype)
            runs = [dict(options, seed=s) for s in REFERENCE_SEEDS] if "seed" in options else [options]
            with torch.no_grad():
                err64 = max(rms_error(common.get_attention(name, **run)(q64, k64, v64, causal=causal), exact, v64)
                            for run in runs)
        max_score = (common.attention_scores(q64, k64)).abs().max().item()
        eps_accumulation = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        bound = ERROR_FACTOR * err64 + RESOLUTION_FACTOR * (torch.finfo(dtype).eps + eps_accumulation * max_score)
        assert err <= bound, f"{where}: error {err:.3g} > {bound:.3g} (float64 run of the same input: {err64:.3g})"


def _qkv(nq=5, nk=6, d=4, dv=3):
    return random_qkv(1, 2, nq, nk, d, dv, seed=0, dtype=torch.float32)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# id: (make (q, k, v, call kwargs) from a valid (q, k, v), exception type, message regex after "<method>: ")
BAD_INPUTS = {
    "q_rank3": (lambda q, k, v: (q[0], k, v, {}), ValueError, r"q must have shape \(B, H, N, D\) \(rank 4\)"),
    "v_rank5": (lambda q, k, v: (q, k, v[None], {}), ValueError, r"v must have shape \(B, H, N, D\)"),
    "not_a_tensor": (lambda q, k, v: (q.tolist(), k, v, {}), TypeError, "q must be a torch.Tensor, got list"),
    "int_keys": (lambda q, k, v: (q, k.long(), v, {}), TypeError, "k must be a floating-point tensor"),
    "complex_values": (lambda q, k, v: (q, k, v.to(torch.complex64), {}), TypeError,
                       "v must be a floating-point tensor"),
    "mixed_dtypes": (lambda q, k, v: (q, k, v.double(), {}), TypeError, "q, k, v must share one dtype"),
    "other_device": (lambda q, k, v: (q, k.to("meta"), v, {}), ValueError, "q, k, v must be on one device"),
    "batch_mismatch": (lambda q, k, v: (q, k.expand(2, -1, -1, -1), v, {}), ValueError,
                       "batch and head dims must match exactly"),
    "head_mismatch": (lambda q, k, v: (q[:, :1], k, v, {}), ValueError, "batch and head dims must match exactly"),
    "head_dim_mismatch": (lambda q, k, v: (q, k[..., :3], v, {}), ValueError, "q and k must have the same head dim"),
    "kv_length_mismatch": (lambda q, k, v: (q, k, v[:, :, :4], {}), ValueError,
                           "k and v must have the same sequence length"),
    "empty_queries": (lambda q, k, v: (q[:, :, :0], k, v, {}), ValueError, "empty sequence: Nq=0"),
    "empty_keys": (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], {}), ValueError, "empty sequence: .*Nk=0"),
    "zero_head_dim": (lambda q, k, v: (q[..., :0], k[..., :0], v, {}), ValueError, "head dims must be >= 1"),
    "nan_query": (lambda q, k, v: (_set(q, (0, 1, 2, 0), float("nan")), k, v, {}), ValueError,
                  r"q contains non-finite values \(nan or inf\)"),
    "inf_value": (lambda q, k, v: (q, k, _set(v, (0, 0, 3, 1), float("inf")), {}), ValueError,
                  "v contains non-finite values"),
    "causal_more_queries_than_keys": (lambda q, k, v: (torch.cat([q, q], 2), k, v, {"causal": True}), ValueError,
                                      "causal=True needs Nq <= Nk"),
    "negative_scale": (lambda q, k, v: (q, k, v, {"scale": -0.5}), ValueError, "scale must be a positive finite"),
    "nan_scale": (lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale must be a positive finite"),
    "string_scale": (lambda q, k, v: (q, k, v, {"scale": "0.5"}), TypeError, "scale must be a positive float or None"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("method", common.available())
def test_bad_input_is_refused_naming_method_and_argument(method, bad):
    make, error, message = BAD_INPUTS[bad]
    q, k, v, kwargs = make(*_qkv())
    attn = common.get_attention(method, **common.method_options(method, seed=0))
    with pytest.raises(error, match=f"^{method}: {message}"):
        attn(q, k, v, **kwargs)


@pytest.mark.parametrize("method", common.available())
def test_bad_options_are_refused_naming_them(method):
    with pytest.raises(ValueError, match=rf"^{method}: unknown option\(s\) 'bogus'"):
        common.get_attention(method, bogus=1)
    for name in common.method_class(method).budgets(64)[0]:  # each budget option refuses a negative value
        with pytest.raises((ValueError, TypeError), match=f"^{method}: {name} must be"):
            common.get_attention(method, **{name: -1})
