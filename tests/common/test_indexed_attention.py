"""common.indexed_attention: the torch reference against the module's equation written densely (float64), the
Triton kernel against the reference under the interpreter (CPU tensors, in a subprocess: TRITON_INTERPRET must be set
before triton is imported) and on CUDA, and the argument checks."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.indexed_attention import (choose_kernel, indexed_attention, reference_indexed_attention,
                                      triton_available, triton_indexed_attention, triton_supports)

ROOT = Path(__file__).resolve().parents[2]


def problem(b=2, h=2, n=96, d=16, dv=16, t=3, m=32, length=80, dtype=torch.float64, query_index=False,
            diagonal=False, seed=0):
    """Random q, k, v and index lists; with ``diagonal`` the last m columns of tile t are the keys t m .. t m + m - 1
    (the tile's own rows); some log-weights are -inf (excluded columns)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    ki = torch.randint(0, n, (b, h, t, length), generator=g)
    if diagonal:
        ki[..., length - m:] = (torch.arange(t) * m).view(t, 1) + torch.arange(m)
    lw = torch.randn(b, h, t, length, generator=g, dtype=dtype)
    lw[..., 3] = float("-inf")
    if diagonal:
        lw[..., length - m:] = 0.0  # the own keys keep weight 1: every row sees at least its own key
    qi = torch.arange(t * m).view(1, 1, t, m) if query_index else None
    return q, k, v, ki, lw, qi


def dense(q, k, v, ki, lw, qi, diagonal, scale):
    """The module docstring's equation, one tile row at a time in float64."""
    b, h, t, length = ki.shape
    m = q.shape[2] // t if qi is None else qi.shape[-1]
    out = torch.zeros(b, h, t, m, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                keys, vals = k[bi, hi, ki[bi, hi, ti]].double(), v[bi, hi, ki[bi, hi, ti]].double()
                for r in range(m):
                    row = ti * m + r if qi is None else qi[0, 0, ti, r]
                    s = scale * keys @ q[bi, hi, row].double()
                    if lw is not None:
                        s = s + lw[bi, hi, ti].double()
                    if diagonal:
                        s[length - m + r + 1:] = float("-inf")
                    out[bi, hi, ti, r] = torch.softmax(s, 0) @ vals
    return out


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("query_index", [False, True])
def test_reference_is_the_equation(diagonal, weighted, query_index):
    q, k, v, ki, lw, qi = problem(b=1, h=2, n=24, d=4, dv=3, t=3, m=8, length=14, diagonal=diagonal,
                                  query_index=query_index)
    lw = lw if weighted else None
    got = reference_indexed_attention(q, k, v, ki, lw, qi, diagonal, scale=0.7)
    torch.testing.assert_close(got, dense(q, k, v, ki, lw, qi, diagonal, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("diagonal", [False, True])
def test_reference_in_bfloat16_is_the_float32_computation(diagonal):
    q, k, v, ki, lw, qi = problem(dtype=torch.float32, diagonal=diagonal)
    ref = reference_indexed_attention(q, k, v, ki, lw, qi, diagonal)
    half = reference_indexed_attention(*(x.bfloat16() for x in (q, k, v)), ki, lw, qi, diagonal)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.03)


def test_auto_is_torch_on_the_cpu_and_bad_arguments_are_named():
    q, k, v, ki, lw, qi = problem(dtype=torch.float32, query_index=True)
    assert choose_kernel("auto", q, k, v) == "torch"
    torch.testing.assert_close(indexed_attention(q, k, v, ki, lw, qi), reference_indexed_attention(q, k, v, ki, lw, qi))
    with pytest.raises(ValueError, match="kernel must be one of"):
        indexed_attention(q, k, v, ki, kernel="cuda")
    with pytest.raises(ValueError, match="key_index must be an int32 / int64"):
        indexed_attention(q, k, v, ki.float())
    with pytest.raises(ValueError, match="split into the T = 5 tiles"):
        indexed_attention(q, k, v, ki[:, :, :1].expand(-1, -1, 5, -1))
    with pytest.raises(ValueError, match="log_weight must be"):
        indexed_attention(q, k, v, ki, lw[..., :5], qi)
    with pytest.raises(ValueError, match="diagonal=True needs"):
        indexed_attention(q, k, v, ki[..., :8], None, qi, diagonal=True)
    if triton_supports(q, k, v) is not None:
        with pytest.raises(ValueError, match="kernel='triton' cannot run"):
            triton_indexed_attention(q, k, v, ki, lw, qi)
    else:  # triton on CUDA or under the interpreter: the launch options are checked
        with pytest.raises(ValueError, match="block_m must be 64 or 128 and block_n 32, 64 or 128"):
            triton_indexed_attention(q, k, v, ki, lw, qi, block_n=16)


# --- the Triton kernel under the interpreter (CPU tensors) ---------------------------------------------------------

INTERPRETER_PRELUDE = textwrap.dedent("""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti

    # two shims for the interpreter of triton 3.5.1 (not for the kernel), each applied only where its problem shows:
    # numpy >= 2.4 refuses int() of the interpreter's 1-element scalar arrays (a runtime loop bound), and its tl.dot
    # multiplies bfloat16 operands as their stored uint16 bit patterns
    try:
        int(np.zeros(1))
    except TypeError:
        patch_tensor = ti._patch_lang_tensor
        def _patch_lang_tensor(tensor, *args, **kwargs):  # (tensor) in 3.5.1, (tensor, scope) in later versions
            patch_tensor(tensor, *args, **kwargs)
            tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
        ti._patch_lang_tensor = _patch_lang_tensor
    if hasattr(ti, "_convert_float") and hasattr(getattr(ti, "InterpreterBuilder", None), "create_dot"):
        create_dot = ti.InterpreterBuilder.create_dot
        def as_float32(x):
            if getattr(x.dtype, "scalar", x.dtype) == tl.bfloat16 and x.data.dtype == np.uint16:
                return ti.TensorHandle(ti._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                       tl.float32)
            return x
        def _create_dot(self, a, b, *args):
            return create_dot(self, as_float32(a), as_float32(b), *args)
        ti.InterpreterBuilder.create_dot = _create_dot
""")


def run_under_interpreter(body: str, timeout: float = 120):
    """Run ``body`` (Python source that prints one JSON line last) in a subprocess with TRITON_INTERPRET=1, the
    shims above and the repository on the path; its parsed JSON."""
    script = INTERPRETER_PRELUDE + f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

CASES = [  # small: the interpreter runs every program in numpy
    dict(dtype="float32", diagonal=False, weighted=False, query_index=False),
    dict(dtype="float32", diagonal=False, weighted=True, query_index=True),
    dict(dtype="float32", diagonal=True, weighted=True, query_index=False),
    dict(dtype="float32", diagonal=True, weighted=False, query_index=True, block_m=128),
    dict(dtype="float32", diagonal=True, weighted=True, query_index=True, block_m=64, block_n=32),
    dict(dtype="float32", diagonal=False, weighted=True, query_index=True, block_m=128, block_n=128),
    dict(dtype="float32", diagonal=True, weighted=True, query_index=True, d=32, dv=16, m=40, length=100),
    dict(dtype="float32", diagonal=False, weighted=True, query_index=False, expanded=True),
    dict(dtype="bfloat16", diagonal=True, weighted=True, query_index=True),
    dict(dtype="float16", diagonal=False, weighted=True, query_index=False),
]
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-3}


def run_case(dtype, diagonal, weighted, query_index, block_m=None, block_n=64, d=16, dv=16, m=32, length=80,
             expanded=False):
    """The kernel and the reference on one problem: the case, the largest difference and the output's dtype. The
    reference runs in float32 (half inputs rounded first); ``expanded``: the log-weights broadcast over the batch
    and heads (stride 0)."""
    q, k, v, ki, lw, qi = problem(b=1, h=2, n=3 * m, d=d, dv=dv, t=3, m=m, length=length, dtype=torch.float32,
                                  query_index=query_index, diagonal=diagonal)
    if expanded:
        lw = lw[:1, :1].expand_as(lw)
    lw = lw if weighted else None
    low = [x.to(getattr(torch, dtype)) for x in (q, k, v)]
    got = triton_indexed_attention(*low, ki, lw, qi, diagonal, scale=0.5, block_m=block_m, block_n=block_n)
    ref = reference_indexed_attention(*(x.float() for x in low), ki, lw, qi, diagonal, scale=0.5)
    return {"case": [dtype, diagonal, weighted, query_index, block_m, block_n, expanded],
            "error": (got.float() - ref).abs().max().item(), "dtype": str(got.dtype)}


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
def test_triton_kernel_equals_the_reference_under_the_interpreter():
    results = run_under_interpreter(f"""
        import json
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_indexed_attention import CASES, run_case
        print(json.dumps([run_case(**case) for case in CASES]))
    """)
    assert len(results) == len(CASES)
    for case, result in zip(CASES, results):
        assert result["dtype"] == f"torch.{case['dtype']}", result
        assert result["error"] <= TOLERANCE[case["dtype"]], result


# --- CUDA ----------------------------------------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_triton_kernel_equals_the_reference_on_cuda(dtype, tol, diagonal):
    # tiles of more rows than a row block, fewer, and not a multiple of it; lists not a multiple of BLOCK_N
    for d, m, length, block_m in ((64, 256, 1000, None), (128, 96, 250, 64)):
        q, k, v, ki, lw, qi = problem(b=2, h=3, n=5 * m, d=d, dv=d, t=5, m=m, length=length, dtype=torch.float32,
                                      query_index=True, diagonal=diagonal, seed=d)
        q, k, v, ki, lw, qi = (x.cuda() for x in (q, k, v, ki, lw, qi))
        low = [x.to(dtype) for x in (q, k, v)]
        got = indexed_attention(*low, ki.int(), lw, qi, diagonal, kernel="triton", block_m=block_m)
        ref = reference_indexed_attention(*(x.float() for x in low), ki, lw, qi, diagonal)
        assert got.dtype == dtype and got.is_cuda
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
        assert choose_kernel("auto", *low) == "triton"


@CUDA
def test_auto_takes_torch_when_a_gradient_is_needed_on_cuda():
    q, k, v, ki, lw, qi = (x.cuda() for x in problem(dtype=torch.float32, query_index=True))
    q.requires_grad_(True)
    assert choose_kernel("auto", q, k, v) == "torch"
    indexed_attention(q, k, v, ki, lw, qi).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        assert choose_kernel("auto", q, k, v) == "triton"
    assert math.isfinite(indexed_attention(q.detach(), k, v, ki, lw, qi).sum().item())
