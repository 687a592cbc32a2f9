"""Shared pieces of the contract suite (tests/contract): a per-test time limit and the input makers.

The time limit turns a hang into a failure: every test here runs under ``signal.setitimer`` (SIGALRM), whose
handler raises :class:`CellTimeout` in the test's thread. Python loops (a descent that never ends) are stopped at
the next bytecode; a C call is only interrupted when it returns (the methods' condition loops are all Python).
"""
from __future__ import annotations

import contextlib
import signal
import time

import pytest
import torch

# Options that change a method's numerics or causal structure enough to be held to the contract on their own
# (issue 17: tree's random-feature estimators hung on float16; knn's lazy Gumbel sampler): label -> (name, options).
VARIANTS = {"tree[RandomFourierFeatures]": ("tree", {"method": "RandomFourierFeatures"}),
            "tree[FAVOR+]": ("tree", {"method": "FAVOR+"}),
            "knn[gumbel]": ("knn", {"estimator": "gumbel"})}

TIME_LIMIT_S = 30.0  # per test: a cell takes milliseconds idle and a few seconds on a machine loaded 5x over


class CellTimeout(Exception):
    """A contract test ran past TIME_LIMIT_S: the method hangs (an unbounded loop) on this input."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CellTimeout` in the block if it runs longer than ``seconds`` (SIGALRM; main thread only).
    Nests: an outer limit is restored, less the time spent inside, when the block ends."""
    def _raise(signum, frame):
        raise CellTimeout(f"ran past the {seconds:g} s limit of a contract cell: a hang")

    previous_handler = signal.signal(signal.SIGALRM, _raise)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


@pytest.fixture(autouse=True)
def cell_time_limit_one_thread():
    # The cells' tensors are tiny: a second intra-op thread only spin-waits (measured: 10x the CPU time of the
    # matrix on the busy 2-core machine), so each test runs single-threaded, and the setting is restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with time_limit(TIME_LIMIT_S):
            yield
    finally:
        torch.set_num_threads(threads)


def random_qkv(b, h, nq, nk, d, dv, *, seed=0, max_score=None, dtype=torch.float64, contiguous=True):
    """Gaussian q (b,h,nq,d), k (b,h,nk,d), v (b,h,nk,dv) in float64, rounded through ``dtype`` (so that a float64
    copy is exactly the input a low-precision run sees). ``max_score``: q and k are scaled together so that the
    largest |score| = |q.k| / sqrt(d) equals it. ``contiguous=False``: the tensors are strided views (heads
    transposed out of a (b, n, h, d) layout, values sliced out of a wider tensor), as a model's projections give."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, nk, h, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, nk, h, dv + 1, generator=gen, dtype=torch.float64)
    if max_score is not None and q.numel() and k.numel():
        largest = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).abs().max() / d ** 0.5
        factor = (max_score / largest) ** 0.5
        q, k = q * factor, k * factor
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    v = v[..., :dv]
    if contiguous:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v
