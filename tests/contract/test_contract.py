"""The one contract suite (issue 12): every registered method, at every budget it declares, held to docs/DESIGN.md.

Per method and budget (``common.budget_options(name, n, seed)``): output shape and dtype for float32, float64,
bfloat16 and float16 inputs; the same seed repeats exactly and (randomised methods) other seeds give other
outputs; causal outputs never depend on future values, nor (two stated exceptions) on future keys; ``step()``
equals the causal forward; ``exact_options`` gives exact attention, and the largest budget beats the smallest;
gradients of trainable methods are finite and reach q, k and v.

Per-method knowledge lives in the methods (class attributes, ``exact_options``); the two exemptions a method's
paper or sampler imposes are stated here with their reason. VARIANTS (conftest.py) adds estimator options that are
held to the contract on their own.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import common
from common.attention import AttentionMethod

from .conftest import VARIANTS, CellTimeout, random_qkv, time_limit

N = 48  # keys; budgets are declared for this n
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Outputs of earlier queries never depend on future values; two methods let them depend on future *keys*:
# - reformer sorts all keys into buckets by their hashes, so which past keys share a chunk with query i depends on
#   where future keys fall (Kitaev et al. 2020, sec. 2; kdeformer/README.md): even the distribution moves;
# - knn's lazy Gumbel sampler draws, for every row, as many variables as that row's own scores require, so future
#   keys (read only by later rows) shift the random stream the earlier rows draw from: each row still samples
#   from its own prefix, and its output is the same *in distribution*, not per draw.
def future_keys_may_change_earlier_outputs(name: str, options: dict) -> bool:
    return name == "reformer" or (name == "knn" and options.get("estimator") == "gumbel")


def _params(test: str, with_budgets: bool = True, variants: bool = False):
    labels = common.available() + (list(VARIANTS) if variants else [])
    for label in labels:
        name, extra = VARIANTS.get(label, (label, {}))
        budgets = common.budget_options(name, N, seed=0) if with_budgets else [None]
        for i, options in enumerate(budgets):
            case = test if options is None else f"{test}-budget{i}"
            yield pytest.param(name, options if options is None else {**options, **extra}, id=f"{label}-{case}")


def _budgets(test, variants=False):
    return pytest.mark.parametrize("name,options", list(_params(test, variants=variants)))


def _methods(test):
    return pytest.mark.parametrize("name,options", list(_params(test, with_budgets=False)))


def relative_error(out, exact):
    return ((out.double() - exact).norm() / exact.norm()).item()


@_budgets("dtypes")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_shape_and_dtype_follow_the_inputs(name, options, dtype):
    for nq, causal in ((N, False), (N, True), (7, True)):
        q, k, v = random_qkv(2, 3, nq, N, 8, 5, seed=3, dtype=DTYPES[dtype])
        with torch.no_grad():
            out = common.get_attention(name, **options)(q, k, v, causal=causal)
        assert out.shape == (2, 3, nq, 5) and out.dtype == DTYPES[dtype] and out.device == q.device
        assert torch.isfinite(out).all()


@_methods("autocast")
def test_a_callers_autocast_changes_nothing(name, options):
    """Inside a model under ``torch.autocast(bfloat16)`` a method gets float32 q/k/v and must return float32, equal
    to the call without autocast (the base class turns autocast off around ``attend``; tree's descent used to fail
    there, issue 14)."""
    q, k, v = random_qkv(1, 2, N, N, 8, 8, seed=4, dtype=torch.float32)
    options = common.method_options(name, {}, seed=0)
    for causal in (False, True):
        with torch.no_grad():
            plain = common.get_attention(name, **options)(q, k, v, causal=causal)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                inside = common.get_attention(name, **options)(q, k, v, causal=causal)
        assert inside.dtype == torch.float32 and torch.equal(inside, plain)


@_budgets("seed", variants=True)
def test_same_seed_repeats_and_other_seeds_differ(name, options):
    q, k, v = random_qkv(1, 2, N, N, 8, 8, seed=4)
    for causal in (False, True):
        run = lambda seed: common.get_attention(name, **dict(options, seed=seed))(q, k, v, causal=causal)
        if not common.method_class(name).randomized:
            assert torch.equal(common.get_attention(name, **options)(q, k, v, causal=causal),
                               common.get_attention(name, **options)(q, k, v, causal=causal))
            continue
        first = run(0)
        assert torch.equal(first, run(0))
        exact = common.softmax_attention(q, k, v, causal=causal)
        # a randomised method draws differently under another seed, unless this budget makes it exact
        assert any(not torch.equal(first, run(seed)) for seed in (1, 2, 3)) \
            or relative_error(first, exact) < common.method_class(name).exact_tolerance


@_budgets("causal", variants=True)
@pytest.mark.parametrize("nq", [N, 20])
def test_causal_outputs_ignore_the_future(name, options, nq):
    # query i (0-based) sits at position i + N - nq and reads keys j <= that position (common.causal_mask)
    q, k, v = random_qkv(1, 2, nq, N, 8, 8, seed=5)
    seen = nq // 2  # queries 0..seen-1 must not see keys from `cut` on
    cut = int(common.causal_query_positions(nq, N)[seen - 1]) + 1
    run = lambda k, v: common.get_attention(name, **options)(q, k, v, causal=True)
    out = run(k, v)
    if nq == N:
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=1e-12, atol=1e-12)  # query 0 reads key 0 only
    v2 = v.clone()
    v2[:, :, cut:] = 1e4
    torch.testing.assert_close(run(k, v2)[:, :, :seen], out[:, :, :seen], rtol=1e-12, atol=1e-12)
    if future_keys_may_change_earlier_outputs(name, options):
        return
    k2 = k.clone()
    k2[:, :, cut:] = 10 * q[:, :, :N - cut]  # future keys made to score highest for the early queries
    torch.testing.assert_close(run(k2, v2)[:, :, :seen], out[:, :, :seen], rtol=1e-12, atol=1e-12)


@_budgets("step", variants=True)
def test_step_equals_the_causal_forward(name, options):
    """Decoding a 5-token prompt and then one token at a time gives the causal forward's outputs.

    A method with its own decoding state (``step`` overridden: SRF, Performer) or a deterministic method must
    give the causal forward of the whole sequence itself (float64, 1e-9). A randomised method that keeps the KV
    cache draws new samples at each call, for the current queries only, so a step is another realisation of the
    estimator than the full forward's (equal in distribution, not per draw); what must hold exactly is that each
    step is the causal forward over the cached prefix with the same random stream, which is checked by replaying
    the calls on a second instance with the same seed.
    """
    q, k, v = random_qkv(1, 2, 16, 16, 8, 8, seed=6)
    decoder = common.get_attention(name, **options)
    state = decoder.init_state()
    cuts = [0, 5] + list(range(6, 17))
    steps = [decoder.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state) for a, b in zip(cuts, cuts[1:])]
    assert len(state) == 16
    keeps_cache = type(decoder).step is AttentionMethod.step
    if keeps_cache and common.method_class(name).randomized:
        replay = common.get_attention(name, **options)
        expected = [replay(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal=True) for a, b in zip(cuts, cuts[1:])]
        for got, want in zip(steps, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(torch.cat(steps, 2), decoder(q, k, v, causal=True), rtol=1e-9, atol=1e-9)


@_budgets("decode_short_prompt")
def test_budget_larger_than_the_prefix_clamps_when_decoding(name, options):
    # the budgets are declared for N keys; decoding starts from one key (docs/DESIGN.md: clamp and warn once)
    q, k, v = random_qkv(1, 2, 8, 8, 8, 8, seed=7)
    attn = common.get_attention(name, **options)
    state = attn.init_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state) for t in range(8)]
    torch.testing.assert_close(outs[0], v[:, :, :1])  # one key: every method returns its value
    assert all(torch.isfinite(o).all() for o in outs)
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) <= 1


@_methods("exact_options")
def test_exact_options_give_exact_attention(name, options):
    cls = common.method_class(name)
    for nq, nk, causal in ((N, N, False), (N, N, True), (9, 40, True), (1, 40, False)):
        exact_options = cls.exact_options(nk)
        if exact_options is None:
            continue
        inputs = [t.requires_grad_(cls.trainable) for t in random_qkv(2, 2, nq, nk, 8, 6, seed=8)]
        attn = common.get_attention(name, **common.method_options(name, exact_options, seed=0))
        out, exact = attn(*inputs, causal=causal), common.softmax_attention(*inputs, causal=causal)
        assert relative_error(out.detach(), exact.detach()) < cls.exact_tolerance
        if cls.trainable:  # exact outputs, exact gradients
            weights = torch.randn(exact.shape, dtype=exact.dtype, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad((out * weights).sum(), inputs)
            for got, want in zip(grads, torch.autograd.grad((exact * weights).sum(), inputs)):
                assert relative_error(got, want) < cls.exact_tolerance


@_methods("largest_budget")
def test_largest_budget_is_closer_to_exact_than_the_smallest(name, options):
    budgets = common.method_class(name).budgets(N)
    if len(budgets) < 2:
        pytest.skip(f"{name} declares a single budget")
    q, k, v = random_qkv(1, 4, N, N, 8, 8, seed=9, max_score=6.0)  # peaked rows: budgets matter
    exact = common.softmax_attention(q, k, v)
    mean_error = lambda options: sum(relative_error(common.get_attention(
        name, **common.method_options(name, options, seed))(q, k, v), exact) for seed in range(4)) / 4
    assert mean_error(budgets[-1]) < mean_error(budgets[0])


@_budgets("gradients", variants=True)
def test_gradients_are_finite_and_reach_q_k_v(name, options):
    if not common.method_class(name).trainable:
        pytest.skip(f"{name} is inference-only")
    base = random_qkv(1, 2, N, N, 8, 5, seed=10)
    weights = torch.randn(1, 2, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for causal in (False, True):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = common.get_attention(name, **options)(q, k, v, causal=causal)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        for t, g in zip((q, k, v), grads):
            assert g.shape == t.shape and torch.isfinite(g).all()
        assert grads[2].abs().sum() > 0  # the values always receive a gradient


def test_time_limit_turns_a_hang_into_a_failure():
    with pytest.raises(CellTimeout, match="0.2 s limit"):
        with time_limit(0.2):
            while True:
                pass
