"""Masks and the log-normaliser (issue 15; docs/DESIGN.md, "Masks and log-normaliser"), for every registered method.

- ``key_padding_mask`` (True = padded key): a padded batch (right and left padding, causal and not) gives, on the real
  positions, what the unpadded sequences give run one by one with the same seed, both under the method's exact
  options (and then equal to the reference) and at a randomised default budget; garbage in the padded keys and
  values changes nothing (padded keys never enter); a sequence with no real key gives zeros, not nan.
- ``attn_mask``: ``exact`` honours any bool or additive mask (equal to :func:`common.softmax_attention` with it); the
  other methods accept a key-padding pattern (equal to the same ``key_padding_mask``) and refuse anything else with
  an error naming the method.
- ``return_lse``: equal to ``torch.logsumexp`` of the masked scores where the method forms a normaliser, mergeable;
  refused naming the method elsewhere.
- Refusals name the argument.
"""
import importlib.util

import pytest
import torch

import common
from common.attention import attention_scores

from .conftest import VARIANTS

B, H, N, D = 3, 2, 12, 4
LENGTHS = (12, 9, 5)  # real keys per batch element; the first one unpadded


def _options(name, budget):
    """The method's exact options at N (None when it has none), or its middle declared budget (seeded)."""
    if budget == "exact":
        return common.method_class(name).exact_options(N)
    options = common.budget_options(name, N, seed=0)
    return options[len(options) // 2]


def _method(name, options):
    return common.get_attention(name, **common.method_options(name, options, seed=0))


def _sequences(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, H, n, D, generator=gen, dtype=dtype) for _ in range(3)) for n in LENGTHS]


def _padded_batch(sequences, padding, fill=0.0):
    """The sequences stacked into (B, H, N, D) with ``fill`` in the padded slots, and the mask (True = padded)."""
    q, k, v = (torch.full((B, H, N, D), fill, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        n = seq[0].shape[2]
        where = slice(0, n) if padding == "right" else slice(N - n, N)
        for padded, real in zip((q, k, v), seq):
            padded[i, :, where] = real[0]
        mask[i, where] = False
    return q, k, v, mask


def _real_rows(mask, i):
    return (~mask[i]).nonzero().squeeze(1)


@pytest.mark.parametrize("budget", ["exact", "default"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", common.methods())
def test_padded_batch_equals_sequences_one_by_one(name, causal, padding, budget):
    if causal and name not in common.methods(causal=True):
        pytest.skip(f"{name} does not run causal")
    options = _options(name, budget)
    if options is None:
        pytest.skip(f"{name} has no exact options")
    sequences = _sequences()
    q, k, v, mask = _padded_batch(sequences, padding)
    with torch.no_grad():
        batched = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask)
        alone_method = _method(name, options)  # same seed, the sequences in batch order
        alone = [alone_method(*seq, causal=causal) for seq in sequences]
    for i, (seq, out) in enumerate(zip(sequences, alone)):
        rows = _real_rows(mask, i)
        torch.testing.assert_close(batched[i:i + 1, :, rows], out, rtol=0, atol=1e-12)
        if budget == "exact":
            reference = common.softmax_attention(*seq, causal=causal)
            tolerance = common.method_class(name).exact_tolerance * reference.norm()
            assert (batched[i:i + 1, :, rows] - reference).norm() <= tolerance
            if not causal and N - len(rows) <= len(rows):
                # the queries at padded positions read the real keys as well (cross-attention), in a call of
                # N - n queries on n keys (exact options promise exact attention for Nq <= Nk only: sblocal)
                full = common.softmax_attention(q[i:i + 1], seq[1], seq[2])
                assert (batched[i:i + 1] - full).norm() <= common.method_class(name).exact_tolerance * full.norm()
        if causal:  # a causal query at a padded position reads nothing: a zero row
            padded_rows = mask[i].nonzero().squeeze(1)
            assert torch.equal(batched[i, :, padded_rows], torch.zeros_like(batched[i, :, padded_rows]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("label", list(VARIANTS))
def test_estimator_variants_padded_batch_equals_sequences_one_by_one(label, causal):
    name, extra = VARIANTS[label]
    options = dict(_options(name, "default"), **extra)
    sequences = _sequences(seed=19)
    q, k, v, mask = _padded_batch(sequences, "left")
    with torch.no_grad():
        batched = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask)
        alone_method = _method(name, options)
        alone = [alone_method(*seq, causal=causal) for seq in sequences]
    for i, out in enumerate(alone):
        torch.testing.assert_close(batched[i:i + 1, :, _real_rows(mask, i)], out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", common.methods())
def test_garbage_in_padded_keys_changes_nothing(name, causal):
    if causal and name not in common.methods(causal=True):
        pytest.skip(f"{name} does not run causal")
    sequences = _sequences(seed=1)
    clean = _padded_batch(sequences, "right")
    garbage = _padded_batch(sequences, "right", fill=1e6)
    options = _options(name, "default")
    with torch.no_grad():
        outs = [_method(name, options)(q, k, v, causal=causal, key_padding_mask=mask) for q, k, v, mask in
                (clean, garbage)]
    real = ~clean[3]
    if not causal:  # the padded queries themselves are garbage in the second input: compare the real queries
        real = real.unsqueeze(1).unsqueeze(-1).expand_as(outs[0])
        torch.testing.assert_close(outs[1][real], outs[0][real], rtol=0, atol=0)
    else:
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", common.methods())
def test_sequence_without_real_keys_gives_zero_rows(name, causal):
    if causal and name not in common.methods(causal=True):
        pytest.skip(f"{name} does not run causal")
    q, k, v, mask = _padded_batch(_sequences(seed=2), "left")
    mask[1] = True
    out = _method(name, _options(name, "default"))(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    if common.method_class(name).supports_lse and not (causal and name in NON_CAUSAL_LSE):
        out_lse, lse = _method(name, _options(name, "default"))(q, k, v, causal=causal, key_padding_mask=mask,
                                                                return_lse=True)
        assert (lse[1] == float("-inf")).all() and not lse.isnan().any() and torch.isfinite(lse[0]).all()
        assert torch.equal(out_lse[1], out[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", common.methods())
def test_half_precision_padded_batch_equals_sequences_one_by_one(name, dtype):
    causal = name in common.methods(causal=True)
    sequences = [tuple(t.to(dtype) for t in seq) for seq in _sequences(seed=17)]
    q, k, v, mask = _padded_batch(_sequences(seed=17), "right")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    options = _options(name, "default")
    with torch.no_grad():
        batched = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask)
        alone_method = _method(name, options)
        alone = [alone_method(*seq, causal=causal) for seq in sequences]
    assert batched.dtype == dtype and torch.isfinite(batched).all()
    for i, out in enumerate(alone):
        torch.testing.assert_close(batched[i:i + 1, :, _real_rows(mask, i)], out, rtol=0, atol=0)


@pytest.mark.parametrize("name", common.methods())
def test_key_padding_attn_mask_equals_key_padding_mask(name):
    q, k, v, mask = _padded_batch(_sequences(seed=3), "left")
    causal = name in common.methods(causal=True)
    options = _options(name, "default")
    with torch.no_grad():
        expected = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask)
        allowed = ~mask[:, None, None, :]                                  # (B, 1, 1, Nk): constant along queries
        with_causal = allowed & common.causal_mask(N, N)                   # what a decoder builds
        additive = torch.zeros(B, 1, N, N, dtype=q.dtype).masked_fill(~with_causal, torch.finfo(q.dtype).min)
        for attn_mask in (allowed, with_causal, additive):
            got = _method(name, options)(q, k, v, causal=causal, attn_mask=attn_mask)
            if name == "exact":  # exact reads the mask as SDPA does: equal on the rows of real queries
                keep = (~mask)[:, None, :, None].expand_as(got)
                torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-12)
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_native_and_generic_key_padding_paths_agree(causal):
    q, k, v, mask = _padded_batch(_sequences(seed=18), "right")
    mask[2] = True  # and an element with no real key
    native = common.get_attention("exact")
    generic = common.get_attention("exact")
    generic.native_mask_elements = 0  # as for a batch too long for one (B, Nq, Nk) mask
    for return_lse in (False, True):
        expected = native(q, k, v, causal=causal, key_padding_mask=mask, return_lse=return_lse)
        got = generic(q, k, v, causal=causal, key_padding_mask=mask, return_lse=return_lse)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in common.methods() if n != "exact"])
def test_general_attn_mask_is_refused_naming_the_method(name):
    q, k, v, _ = _padded_batch(_sequences(seed=4), "right")
    general = torch.rand(1, 1, N, N, generator=torch.Generator().manual_seed(0)) < 0.7
    general[..., 0] = True
    attn = _method(name, _options(name, "default"))
    with pytest.raises(ValueError, match=rf"^{name}: attn_mask is not a key-padding pattern; only exact honours"):
        attn(q, k, v, attn_mask=general)
    with pytest.raises(ValueError, match=rf"^{name}: attn_mask has additive values other than 0 and -inf"):
        attn(q, k, v, attn_mask=torch.randn(N, N, dtype=q.dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(B, H, N, N), (B, 1, N, N), (N, N), (1, N), (H, 1, N)])
def test_exact_honours_any_attn_mask(shape, causal):
    q, k, v, _ = _padded_batch(_sequences(seed=5), "right")
    gen = torch.Generator().manual_seed(1)
    allowed = torch.rand(*shape, generator=gen) < 0.6
    allowed[..., -1] = True  # every row reads a key (the reference formula gives nan for an empty row)
    if causal:
        allowed = allowed & common.causal_mask(N, N) | torch.eye(N, dtype=torch.bool)
    additive = torch.randn(*shape, generator=gen, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    exact = common.get_attention("exact")
    for attn_mask in (allowed, additive):
        reference = common.softmax_attention(q, k, v, causal=causal, attn_mask=attn_mask)
        torch.testing.assert_close(exact(q, k, v, causal=causal, attn_mask=attn_mask), reference)
        out, lse = exact(q, k, v, causal=causal, attn_mask=attn_mask, return_lse=True)
        torch.testing.assert_close(out, reference)
        torch.testing.assert_close(lse, torch.logsumexp(attention_scores(q, k, causal, None, attn_mask), -1))


def test_exact_row_without_allowed_key_is_zero_not_nan():
    q, k, v, _ = _padded_batch(_sequences(seed=6), "right")
    allowed = torch.ones(N, N, dtype=torch.bool)
    allowed[3] = False
    for attn_mask in (allowed, torch.zeros(N, N, dtype=q.dtype).masked_fill(~allowed, float("-inf"))):
        out, lse = common.get_attention("exact")(q, k, v, attn_mask=attn_mask, return_lse=True)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and (lse[:, :, 3] == float("-inf")).all()
        torch.testing.assert_close(common.get_attention("exact")(q, k, v, attn_mask=attn_mask), out)
        assert torch.isfinite(out).all() and not lse.isnan().any()


def test_mask_refusals_name_the_argument():
    q, k, v, mask = _padded_batch(_sequences(seed=7), "right")
    attn = common.get_attention("knn")
    cases = [
        (dict(key_padding_mask=mask.long()), TypeError, r"^knn: key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=mask[:, :-1]), ValueError, r"^knn: key_padding_mask must have shape \(B, Nk\)"),
        (dict(key_padding_mask=mask[None]), ValueError, r"^knn: key_padding_mask must have shape"),
        (dict(key_padding_mask=mask.tolist()), TypeError, r"^knn: key_padding_mask must be a torch.Tensor"),
        (dict(attn_mask=torch.ones(N, N, dtype=torch.float32)), TypeError, r"^knn: attn_mask must be a bool .* "
                                                                           r"dtype torch.float64"),
        (dict(attn_mask=torch.ones(N, N, dtype=torch.int64)), TypeError, r"^knn: attn_mask must be a bool"),
        (dict(attn_mask=torch.ones(N, N - 1, dtype=torch.bool)), ValueError,
         r"^knn: attn_mask must be broadcastable to \(B, H, Nq, Nk\)"),
        (dict(attn_mask=torch.ones(2, B, H, N, N, dtype=torch.bool)), ValueError, r"^knn: attn_mask must be broad"),
        (dict(attn_mask=torch.ones(5, 1, N, N, dtype=torch.bool)), ValueError, r"^knn: attn_mask must be broad"),
        (dict(attn_mask=torch.full((N, N), float("nan"), dtype=torch.float64)), ValueError,
         r"^knn: attn_mask \(additive\) contains nan"),
        (dict(attn_mask=[[True]]), TypeError, r"^knn: attn_mask must be a torch.Tensor"),
        (dict(return_lse=1), TypeError, r"^knn: return_lse must be a bool"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            attn(q, k, v, **kwargs)


@pytest.mark.parametrize("name", common.methods())
def test_gqa_and_key_padding_compose(name):
    q, k, v, mask = _padded_batch(_sequences(seed=8), "left")
    k, v = k[:, :1], v[:, :1]  # one key/value head for H query heads
    causal = name in common.methods(causal=True)
    options = _options(name, "default")
    with torch.no_grad():
        grouped = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask, enable_gqa=True)
        repeated = _method(name, options)(q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1), causal=causal,
                                          key_padding_mask=mask)
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)


def _lse_methods():
    return [n for n in common.methods() if common.method_class(n).supports_lse]


# methods whose causal path keeps no normaliser: return_lse=True with causal=True raises, naming the method
NON_CAUSAL_LSE = {"kdeformer"}


def _masked_logsumexp(q, k, mask, causal):
    """log sum_j exp(s_ij) over the keys query i reads under the key padding ``mask`` (float64 reference)."""
    allowed = ~mask[:, None, None, :]
    if causal:
        allowed = allowed & common.causal_mask(N, N) & ~mask[:, None, :, None]
    return torch.logsumexp(attention_scores(q, k, causal=False).masked_fill(~allowed, float("-inf")), -1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", _lse_methods())
def test_return_lse_is_the_log_normaliser_under_exact_options(name, causal, padded):
    if causal and name not in common.methods(causal=True):
        pytest.skip(f"{name} does not run causal")
    options = _options(name, "exact")
    if options is None:
        pytest.skip(f"{name} has no exact options: its lse is an estimate "
                    "(test_estimated_lse_is_an_unbiased_normaliser)")
    q, k, v, mask = _padded_batch(_sequences(seed=9), "left")
    mask = mask if padded else torch.zeros_like(mask)
    if causal and name in NON_CAUSAL_LSE:
        with pytest.raises(ValueError, match=rf"^{name}: return_lse=True is not supported with causal=True"):
            _method(name, options)(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
        return
    with torch.no_grad():
        out, lse = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    expected = _masked_logsumexp(q, k, mask, causal)
    assert lse.shape == (B, H, N) and lse.dtype == torch.float64
    # rows checked: all, except non-causal queries at padded positions of an element with more of them than real
    # keys (a call of Nq > Nk, where exact options promise nothing: sblocal)
    n_real = (~mask).sum(1, keepdim=True)
    checked = (~mask | causal | (N - n_real <= n_real))[:, None, :].expand_as(lse)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse - expected)[finite & checked].abs().max() <= common.method_class(name).exact_tolerance
    torch.testing.assert_close(out, _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask))


# Methods whose normaliser estimate is unbiased, E[e^lse] = sum_j e^{s_ij}: kdeformer (exact LSH blocks plus an
# importance-weighted residual, Zandieh et al. 2023, Sec. 3), sblocal (exact local blocks plus FAVOR+ low rank,
# Chen et al. 2021), srf and performer (positive random features, Choromanski et al. 2021, Lemma 1; Reid et al.
# 2023), uniform (|P_i| / l times the sum over l uniform samples), knn's default 'adaptive' estimator (the
# retrieved keys exactly plus |T_i| / l times a uniform tail sample, Haris 2024). (reformer drops the keys outside
# a query's buckets, tree summarises a bud by its mean key: both biased, checked only under exact options.)
# name -> options added to the smallest budget (knn: k_max = k, else the adaptive set covers the whole short causal
# prefix and the estimate is exact).
UNBIASED_LSE = {"kdeformer": {}, "knn": {"k_max": 2}, "performer": {}, "sblocal": {}, "srf": {}, "uniform": {}}


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", [n for n in UNBIASED_LSE if common.method_class(n).supports_lse])
def test_estimated_lse_is_an_unbiased_normaliser(name, causal):
    if causal and (name in NON_CAUSAL_LSE or name not in common.methods(causal=True)):
        pytest.skip(f"{name} has no causal return_lse")
    q, k, v, mask = _padded_batch(_sequences(seed=13), "left")
    q, k = q * 0.5, k * 0.5  # moderate scores: a few hundred draws pin the mean down
    options = dict(common.budget_options(name, N)[0], **UNBIASED_LSE[name])  # the smallest budget: far from exact
    ratios = []
    with torch.no_grad():
        for seed in range(200):  # a fresh instance per seed (srf draws its projection once per instance)
            attn = common.get_attention(name, **options, seed=seed)
            ratios.append(attn(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)[1])
    expected = _masked_logsumexp(q, k, mask, causal)
    rows = torch.isfinite(expected)
    ratio = (torch.stack(ratios) - expected).exp()[:, rows]  # e^lse / D per draw and row
    mean, stderr = ratio.mean(0), ratio.std(0) / len(ratios) ** 0.5
    assert ratio.std(0).max() > 1e-3  # a real estimate (not exact at this budget)
    assert ((mean - 1).abs() <= 5 * stderr + 1e-9).all(), (mean - 1).abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_exact_lse_merges_two_halves_of_the_keys_into_full_attention(causal):
    q, k, v, _ = _padded_batch(_sequences(seed=10), "right")
    exact = common.get_attention("exact")
    half = N // 2
    if causal:  # the keys [0, half) and the rest, causal masks; a query before `half` reads none of the rest
        allowed = common.causal_mask(N, N)
        out1, lse1 = exact(q, k[:, :, :half], v[:, :, :half], attn_mask=allowed[:, :half], return_lse=True)
        out2, lse2 = exact(q, k[:, :, half:], v[:, :, half:], attn_mask=allowed[:, half:], return_lse=True)
        assert (lse2[:, :, :half] == float("-inf")).all() and torch.equal(out2[:, :, :half], 0 * out2[:, :, :half])
    else:  # the two halves as key padding of the whole sequence
        first = torch.zeros(B, N, dtype=torch.bool)
        first[:, half:] = True
        out1, lse1 = exact(q, k, v, key_padding_mask=first, return_lse=True)
        out2, lse2 = exact(q, k, v, key_padding_mask=~first, return_lse=True)
    total = torch.logaddexp(lse1, lse2)
    merged = (lse1 - total).exp().unsqueeze(-1) * out1 + (lse2 - total).exp().unsqueeze(-1) * out2
    full, full_lse = exact(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(total, full_lse)


class _NoNormaliser(common.AttentionMethod):
    """A method without ``supports_lse`` (every registered method has it today, with option-level refusals below)."""
    name = "no_normaliser"

    def attend(self, q, k, v, causal, scale):
        return common.softmax_attention(q, k, v, causal, scale)


def test_return_lse_is_refused_where_the_method_forms_no_normaliser():
    q, k, v, mask = _padded_batch(_sequences(seed=11), "right")
    unsupported = [n for n in common.methods() if not common.method_class(n).supports_lse]
    for attn in [_NoNormaliser()] + [_method(n, _options(n, "default")) for n in unsupported]:
        with pytest.raises(ValueError, match=rf"^{attn.name}: return_lse=True is not supported"):
            attn(q, k, v, return_lse=True, key_padding_mask=mask)
    torch.testing.assert_close(_NoNormaliser()(q, k, v, key_padding_mask=mask),  # masks need no lse
                               common.get_attention("exact")(q, k, v, key_padding_mask=mask))


@pytest.mark.parametrize("options", [{"estimator": "gumbel"}, {"index": "ivf_blas", "estimator": "topk"},
                                     {"index": "ivf_blocks"}])
def test_knn_without_a_normaliser_refuses_lse(options):
    q, k, v, _ = _padded_batch(_sequences(seed=11), "right")
    with pytest.raises(ValueError, match=r"^knn: return_lse=True is not supported with estimator="):
        common.get_attention("knn", seed=0, **options)(q, k, v, return_lse=True)
    q.requires_grad_()
    with pytest.raises(ValueError, match=r"^knn: return_lse=True is not supported with gradient='sampled'"):
        common.get_attention("knn", seed=0, gradient="sampled")(q, k, v, return_lse=True)


def test_tree_report_combination_refuses_lse():
    q, k, v, _ = _padded_batch(_sequences(seed=11), "right")
    with pytest.raises(ValueError, match=r"^tree: return_lse=True needs bud_value='count'"):
        common.get_attention("tree", bud_value="report", seed=0)(q, k, v, return_lse=True)


def test_padded_path_gradients_equal_the_sequences_alone():
    sequences = _sequences(seed=12)
    q, k, v, mask = (t.requires_grad_() if t.is_floating_point() else t for t in _padded_batch(sequences, "left"))
    for name in ("exact", "uniform"):
        out = _method(name, _options(name, "default"))(q, k, v, causal=True, key_padding_mask=mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        for i, seq in enumerate(sequences):
            leaves = [t.detach().requires_grad_() for t in seq]
            alone = _method(name, _options(name, "default"))
            for j in range(i):  # the same random stream: the earlier sequences first
                alone(*sequences[j], causal=True)
            expected = torch.autograd.grad(alone(*leaves, causal=True).square().sum(), leaves)
            rows = _real_rows(mask, i)
            for grad, want in zip(grads, expected):
                torch.testing.assert_close(grad[i:i + 1, :, rows], want, rtol=0, atol=1e-12)
                padded = mask[i].nonzero().squeeze(1)
                assert torch.equal(grad[i, :, padded], torch.zeros_like(grad[i, :, padded]))


# --- on a GPU (skipped without CUDA): the same guarantees through the CUDA kernels ----------------------------
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("name", common.methods())
def test_cuda_padded_batch_equals_sequences_one_by_one(name):
    causal = name in common.methods(causal=True)
    sequences = [tuple(t.float().cuda() for t in seq) for seq in _sequences(seed=14)]
    q, k, v, mask = (t.cuda() for t in _padded_batch(_sequences(seed=14), "left"))
    q, k, v = q.float(), k.float(), v.float()
    options = _options(name, "default")
    if name == "knn":
        options = dict(options, index="torch")  # the on-device index (faiss is CPU-only)
    with torch.no_grad():
        batched = _method(name, options)(q, k, v, causal=causal, key_padding_mask=mask)
        alone_method = _method(name, options)
        alone = [alone_method(*seq, causal=causal) for seq in sequences]
    assert batched.is_cuda and torch.isfinite(batched).all()
    for i, out in enumerate(alone):
        torch.testing.assert_close(batched[i:i + 1, :, _real_rows(mask.cpu(), i).cuda()], out, rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_exact_masks_and_lse_in_every_dtype(dtype):
    q, k, v, mask = _padded_batch(_sequences(seed=15), "right")
    mask[1] = True  # an element with no real key: SDPA's fused kernels must not turn its rows into nan
    reference, reference_lse = common.get_attention("exact")(q, k, v, causal=True, key_padding_mask=mask,
                                                             return_lse=True)
    exact = common.get_attention("exact")
    args = [t.to(dtype).cuda() for t in (q, k, v)]
    out = exact(*args, causal=True, key_padding_mask=mask.cuda())
    out_lse, lse = exact(*args, causal=True, key_padding_mask=mask.cuda(), return_lse=True)
    tolerance = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    for got in (out, out_lse):
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double().cpu(), reference, rtol=tolerance, atol=tolerance)
    assert lse.dtype == torch.float32 and not lse.isnan().any()
    torch.testing.assert_close(lse.double().cpu(), reference_lse, rtol=tolerance, atol=tolerance)


@CUDA
def test_cuda_srf_lse_is_the_same_on_every_core():
    from common.linear_attention import fla_available
    q, k, v, _ = _padded_batch(_sequences(seed=16), "right")
    args = [t.to(torch.bfloat16).cuda() for t in (q, k, v)]
    cores = ["torch"] + (["fla"] if fla_available() else []) + \
        (["flash"] if importlib.util.find_spec("triton") is not None else [])
    results = [common.get_attention("srf", seed=0, attn_fn=core)(*args, causal=True, return_lse=True)
               for core in cores]
    for out, lse in results:
        assert torch.isfinite(out).all() and torch.isfinite(lse).all() and lse.dtype == torch.float32
        torch.testing.assert_close(lse, results[0][1], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out.float(), results[0][0].float(), rtol=3e-2, atol=3e-2)
