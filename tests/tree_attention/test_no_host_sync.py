"""tree's device path reads nothing back to the host (issue 13), its round bound holds, and the early exit
(opt-in off the CPU) changes no output.

On CPU tensors, standing in for CUDA, ``tests/sync_watch.py`` records every op that would read device memory on the
host (``.item()`` / ``bool(t)`` / ``int(t)``, data-dependent shapes, copies between devices) while ``tree`` runs
with ``early_exit=False`` (the default off the CPU) and ``check_finite=False``; with CUDA the same calls, with the
default options, run under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import numpy as np
import pytest
import torch

import common
from common.data import synthetic_qkv
from common.validation import NonFiniteError
from tests.sync_watch import run_watched, sync_debug_errors
from tree_attention.mass_estimators import METHODS, MassEstimator
from tree_attention.np_attention import TreeAttention, number_of_terms
from tree_attention.tree import PrefixSummaries, descend, resolve_early_exit, round_bound

TREE_METHODS = [m for m in METHODS if m != "tree-less"]


def _qkv(n=48, dtype=torch.float32, device="cpu"):
    x = synthetic_qkv("clustered", 1, 2, n, n, 8, seed=0, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (x.q, x.k, x.v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_device_path_reads_nothing_back_on_cpu(method, causal, monkeypatch):
    q, k, v = _qkv()
    attn = TreeAttention(method=method, number_of_terms_exponent=0.7, parallelism=4, R=16, seed=0,
                         early_exit=False, check_finite=False)
    out, found = run_watched(lambda: attn(q, k, v, causal=causal), "cpu", monkeypatch)
    assert found == [] and out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("options", [{"query_block": 7}, {"bud_value": "report"}, {"expansions": "P"},
                                     {"query_block": 5, "method": "FAVOR+", "return_lse": True}], ids=str)
def test_blocks_rules_and_lse_read_nothing_back_on_cpu(options, monkeypatch):
    options = dict(options)
    return_lse = options.pop("return_lse", False)
    q, k, v = _qkv(dtype=torch.bfloat16)
    attn = TreeAttention(number_of_terms_exponent=0.7, parallelism=4, R=16, seed=0, early_exit=False,
                         check_finite=False, **options)
    result, found = run_watched(lambda: attn(q, k, v, causal=True, return_lse=return_lse), "cpu", monkeypatch)
    out = result[0] if return_lse else result
    assert found == [] and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_the_early_exit_and_check_finite_are_the_reads(monkeypatch):
    """Control: the watch does see the early exit's per-round read and check_finite's reads."""
    q, k, v = _qkv()
    for options in ({"early_exit": True, "check_finite": False}, {"early_exit": False, "check_finite": True}):
        found = run_watched(lambda: TreeAttention(seed=0, **options)(q, k, v, causal=True), "cpu", monkeypatch)[1]
        assert any("_local_scalar_dense" in f for f in found), options
    assert resolve_early_exit(None, "cpu") and not resolve_early_exit(None, torch.device("cuda", 0))
    assert resolve_early_exit(True, "cuda") and not resolve_early_exit(False, "cpu")
    with pytest.raises(ValueError, match="early_exit"):
        TreeAttention(early_exit="yes")


@pytest.mark.parametrize("rule", ["needed", "P"])
@pytest.mark.parametrize("method", TREE_METHODS)
def test_early_exit_on_off_and_default_give_the_same_output(method, rule):
    """One descent per call (one query block), a fresh seeded module each: the rounds the early exit skips change
    no bud, so on, off and the default give the same output and the same inner products."""
    q, k, v = _qkv(dtype=torch.float64)
    for causal in (True, False):
        runs = []
        for flag in (True, False, None):
            attn = TreeAttention(method=method, number_of_terms_exponent=0.7, parallelism=4, R=16, expansions=rule,
                                 seed=3, early_exit=flag)
            runs.append((attn(q, k, v, causal=causal), attn.last_inner_products))
        for out, inner in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(inner, runs[0][1])


class MostRecentFirst(MassEstimator):
    """An adversarial pm for the round bound: the most recent subtree first (the path to t, whose right children
    are empty), then the smallest."""

    def log_mass(self, score, count, start, stop, position, log_offset=0.0):
        return (stop.double() * 10 - count.double()).masked_fill(count <= 1, float("-inf"))


@pytest.mark.parametrize("P", [1, 4])
@pytest.mark.parametrize("method", ["alignment", "uniform", "time-decay", "FAVOR+", "most-recent"])
def test_round_bound_holds_for_every_query(method, P):
    """Each query, allowed exactly its own round_bound rounds, is done within them (descend raises otherwise: the
    queries of one bound run together, stopping early once all are done), under both rules and e = 0.6 and 1
    (every leaf); too few rounds raise."""
    n = 32
    x = synthetic_qkv("clustered", 2, 2, n, n, 8, seed=1, dtype=torch.float64)
    est = (MostRecentFirst("uniform", 8, 8 ** -0.5) if method == "most-recent" else
           MassEstimator(method, 8, 8 ** -0.5, R=16, generator=torch.Generator().manual_seed(0)))
    positions = torch.arange(n)
    summaries = PrefixSummaries(x.k, x.v, n, positions, est)
    for e in (0.6, 1.0):
        T = number_of_terms(positions + 1, e)
        bound = torch.from_numpy(round_bound(positions, T, n, P))
        for rule in ("needed", "P"):
            for r in bound.unique():
                idx = bound == r
                buds, _ = descend(summaries.for_queries(positions[idx]), est, x.q[:, :, idx], positions[idx], T[idx],
                                  n, P, torch.Generator().manual_seed(2), expansions=rule, early_exit=True,
                                  rounds=int(r))
                assert ((buds >= 0).sum(-1) >= torch.minimum(T[idx], positions[idx] + 1)).all()
    with pytest.raises(RuntimeError, match="did not end within its bound of 2 rounds"):
        descend(summaries, est, x.q, positions, number_of_terms(positions + 1, 1.0), n, P,
                torch.Generator().manual_seed(2), early_exit=False, rounds=2)


def test_round_bound_is_tighter_than_the_old_one():
    """The old bound ceil((T + log2 L) / P) + 2 log2 L + 2 of the last query at n = 131,072, T = 363, P = 16 is 60
    rounds; the per-query bound of the last block is 46."""
    positions = np.arange(131072 - 4096, 131072)
    bound = round_bound(positions, number_of_terms(positions + 1, 0.5), 131072, 16)
    T_last, log2_L, P = int(number_of_terms(np.array([131072]), 0.5)[0]), 17, 16
    old = -(-(T_last + log2_L) // P) + 2 * log2_L + 2
    assert int(bound.max()) == 46 and (T_last, old) == (363, 60)


def test_flags_raise_lazily_only_under_check_finite(monkeypatch):
    """A nan mass: raised (NonFiniteError naming the method) after the call under check_finite=True; with
    check_finite=False nothing is read, those buds are drawn like buds of mass 0 and the output stays finite."""
    monkeypatch.setattr(MassEstimator, "log_mass",
                        lambda self, *a, _f=MassEstimator.log_mass: _f(self, *a) * float("nan"))
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="tree: the 'alignment' attention-mass estimate is nan"):
        TreeAttention(number_of_terms_exponent=0.7, seed=0, query_block=9)(q, k, v, causal=True)
    out = TreeAttention(number_of_terms_exponent=0.7, seed=0, check_finite=False)(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    flags = torch.zeros(2, dtype=torch.bool)
    positions = torch.arange(q.shape[2])
    est = MassEstimator("alignment", 8, 8 ** -0.5)
    descend(PrefixSummaries(k, v, 64, positions, est), est, q, positions, number_of_terms(positions + 1, 0.7), 64, 4,
            torch.Generator().manual_seed(0), early_exit=False, rounds=1, flags=flags)
    assert flags.tolist() == [True, True]  # or-ed into the caller's flags, not raised


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_default_never_synchronises_nor_leaves_the_device(method, dtype, causal, monkeypatch):
    """Default options (early_exit off on CUDA), check_finite=False: no synchronisation, no host read, output and
    inner products on the GPU in the input dtype; the same output as the early exit's (one block)."""
    q, k, v = _qkv(n=300, dtype=dtype, device="cuda")
    make = lambda **o: TreeAttention(method=method, number_of_terms_exponent=0.6, parallelism=4, R=16, seed=0, **o)
    make(check_finite=False)(q, k, v, causal=causal)  # warm-up: lazy CUDA initialisation may synchronise once
    attn = make(check_finite=False)
    with sync_debug_errors():
        out, found = run_watched(lambda: attn(q, k, v, causal=causal), q.device, monkeypatch)
    assert found == [] and out.device == q.device and out.dtype == dtype
    assert attn.last_inner_products.device == q.device and torch.isfinite(out).all()
    early = make(early_exit=True)
    torch.testing.assert_close(early(q, k, v, causal=causal), out, rtol=0, atol=0)
    assert torch.equal(early.last_inner_products, attn.last_inner_products)


@needs_cuda
@pytest.mark.parametrize("method", ["alignment", "RandomFourierFeatures"])
def test_cuda_early_exit_on_off_same_output_over_blocks_and_calls(method):
    """On CUDA each descent leaves the Philox generator at a position independent of the rounds it ran, so the
    early exit and the default (off) give the same outputs over several query blocks and repeated calls."""
    q, k, v = _qkv(n=300, device="cuda")
    modules = [TreeAttention(method=method, number_of_terms_exponent=0.6, parallelism=4, R=16, query_block=64, seed=0,
                             early_exit=flag) for flag in (True, None)]
    for _ in range(2):
        (on, off) = (m(q, k, v, causal=True) for m in modules)
        assert torch.equal(on, off)
        assert torch.equal(modules[0].last_inner_products, modules[1].last_inner_products)


@needs_cuda
def test_cuda_several_query_blocks_never_synchronise(monkeypatch):
    q, k, v = _qkv(n=300, device="cuda")
    attn = common.get_attention("tree", number_of_terms_exponent=0.6, parallelism=4, query_block=64, seed=0,
                                check_finite=False)
    attn(q, k, v, causal=True)
    with sync_debug_errors():
        out, found = run_watched(lambda: attn(q, k, v, causal=True, return_lse=True), q.device, monkeypatch)
    assert found == [] and out[0].device == q.device and torch.isfinite(out[0]).all()
