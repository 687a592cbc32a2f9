import math

import pytest
import torch
import torch.nn.functional as F

import common
from common.attention import causal_mask
from common.data import planted_indices, synthetic_qkv


def test_hand_computed_two_keys():
    # one query, two keys: scores s*(q.k) = (1, 0) with scale 1 -> weights (e/(1+e), 1/(1+e))
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[2.0], [4.0]]]], dtype=torch.float64)
    w = math.e / (1 + math.e)
    expected = w * 2.0 + (1 - w) * 4.0
    for fn in (common.softmax_attention, common.get_attention("exact")):
        assert fn(q, k, v, scale=1.0).item() == pytest.approx(expected, abs=1e-12)


def test_uniform_scores_give_mean_of_values():
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 2, dtype=torch.float64)
    out = common.softmax_attention(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 1, 3, 2))
    causal = common.softmax_attention(q, k[:, :, :3], v[:, :, :3], causal=True)
    cummean = v[:, :, :3].cumsum(2) / torch.arange(1, 4, dtype=torch.float64).view(1, 1, 3, 1)
    torch.testing.assert_close(causal, cummean)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(17, 17), (5, 23)])
def test_reference_agrees_with_sdpa_float64(causal, nq, nk):
    x = synthetic_qkv("gaussian", 2, 3, nq, nk, 8, value_dim=5, dtype=torch.float64, seed=1)
    ref = common.softmax_attention(x.q, x.k, x.v, causal=causal, scale=0.3)
    out = common.get_attention("exact")(x.q, x.k, x.v, causal=causal, scale=0.3)
    assert (ref - out).abs().max().item() < 1e-6
    if nq == nk:
        sdpa = F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=causal, scale=0.3)
        assert (ref - sdpa).abs().max().item() < 1e-6


def test_causal_mask_bottom_right():
    # (registered methods' causality: tests/contract/test_contract.py::test_causal_outputs_ignore_the_future)
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert common.causal_query_positions(2, 4).tolist() == [2, 3]


def test_attention_weights_rows_and_planted_argmax():
    x = synthetic_qkv("planted", 1, 2, 12, 20, 16, dtype=torch.float64)
    w = common.attention_weights(x.q, x.k)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 12, dtype=torch.float64))
    assert torch.equal(w.argmax(-1)[0, 0], planted_indices(12, 20))
    assert torch.equal(common.attention_weights(x.q, x.k, causal=True).argmax(-1)[0, 1], planted_indices(12, 20))


def test_default_scale_is_inverse_sqrt_d():
    x = synthetic_qkv("gaussian", 1, 1, 4, 6, 9, dtype=torch.float64)
    torch.testing.assert_close(common.softmax_attention(x.q, x.k, x.v),
                               common.softmax_attention(x.q, x.k, x.v, scale=1 / 3))


def test_kv_cache_grows_and_refuses_mismatched_tokens():
    # (step() == causal forward for every method: tests/contract/test_contract.py::test_step_equals_the_causal_forward)
    state = common.KVCache()
    assert len(state) == 0 and state.keys is None
    k, v = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 5)
    state.append(k, v)
    state.append(k[:, :, :1], v[:, :, :1])
    assert len(state) == 5 and torch.equal(state.keys[:, :, 4], k[:, :, 0]) and torch.equal(state.values[:, :, :4], v)
    with pytest.raises(ValueError, match="KVCache: new keys"):
        state.append(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 5))


def test_exact_gradients_match_reference():
    x = synthetic_qkv("gaussian", 1, 2, 6, 6, 4, dtype=torch.float64)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda a, b, c: common.get_attention("exact")(a, b, c, causal=True), (q, k, v))


def test_gather_rows_and_allowed_counts():
    from common.attention import allowed_key_counts, gather_rows
    x = torch.arange(2 * 3 * 5 * 2, dtype=torch.float32).view(2, 3, 5, 2)
    idx = torch.tensor([4, 0]).view(1, 1, 2).expand(2, 3, 2)
    g = gather_rows(x, idx)
    assert g.shape == (2, 3, 2, 2) and torch.equal(g[1, 2, 0], x[1, 2, 4]) and torch.equal(g[0, 1, 1], x[0, 1, 0])
    with pytest.raises(ValueError, match="gather_rows"):
        gather_rows(x, torch.zeros(1, 3, 2, dtype=torch.long))
    assert allowed_key_counts(3, 5, True).tolist() == [3, 4, 5]
    assert allowed_key_counts(3, 5, False).tolist() == [5, 5, 5]


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)])
def test_empty_batch_or_heads_returns_empty_like_sdpa(shape):
    b, h = shape
    q, k, v = torch.randn(b, h, 3, 4), torch.randn(b, h, 5, 4), torch.randn(b, h, 5, 6)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    for name in ("exact", "uniform"):
        out = common.get_attention(name, **common.method_options(name, seed=0))(q, k, v, causal=True)
        assert out.shape == sdpa.shape == (b, h, 3, 6) and out.dtype == torch.float32
    half = common.get_attention("exact")(q.half(), k.half(), v.half())
    assert half.shape == (b, h, 3, 6) and half.dtype == torch.float16
    with pytest.raises(ValueError, match="empty sequence"):  # an empty sequence is still refused
        common.get_attention("exact")(q[:, :, :0], k, v)


class _Overflowing(common.AttentionMethod):
    name = "overflowing"

    def attend(self, q, k, v, causal, scale):
        return torch.exp(torch.matmul(q, k.transpose(-2, -1)) * scale * 1e4) @ v


def test_non_finite_output_from_finite_inputs_is_an_error_naming_the_method():
    q = torch.ones(1, 1, 2, 3)
    with pytest.raises(common.NonFiniteError, match="overflowing: output has 6 non-finite"):
        _Overflowing()(q, q, q)
    assert torch.isinf(_Overflowing(check_finite=False)(q, q, q)).all()  # the switch turns both checks off
    torch.testing.assert_close(_Overflowing()(q * 0, q, q), torch.full((1, 1, 2, 3), 2.0))  # finite: passes


def test_exact_options():
    assert common.method_class("exact").exact_options(7) == {}
    assert common.method_class("uniform").exact_options(7) is None  # sampling with replacement is never exact
    assert common.AttentionMethod.exact_options(7) is None


# --- masks and the log-normaliser (issue 15; every method: tests/contract/test_masks.py) ----------------------
def test_attention_with_lse_in_key_chunks_equals_one_chunk_and_the_reference():
    from common.attention import attention_with_lse
    x = synthetic_qkv("gaussian", 2, 3, 7, 11, 4, value_dim=5, dtype=torch.float64, seed=2)
    allowed = torch.rand(2, 1, 7, 11, generator=torch.Generator().manual_seed(0)) < 0.7
    allowed[..., 0] = True
    for causal, mask in ((False, None), (True, None), (False, allowed), (True, allowed), (True, allowed[0, 0]),
                         (False, allowed[0, 0, 0])):  # masks of rank 4, 2 (Nq, Nk) and 1 (Nk)
        scores = common.attention_scores(x.q, x.k, causal, 0.4, mask)
        reference = (torch.softmax(scores, -1) @ x.v, torch.logsumexp(scores, -1))
        # tiles of one query x one key, 7 queries x 4 keys, 2 queries x 4 keys, everything at once
        for chunk_elements, min_keys in ((1, 1), (2 * 3 * 7 * 4, 1), (2 * 3 * 2 * 4, 4), (1 << 24, 256)):
            out, lse = attention_with_lse(x.q, x.k, x.v, 0.4, causal, mask, chunk_elements, min_keys)
            torch.testing.assert_close(out, reference[0])
            torch.testing.assert_close(lse, reference[1])


def test_attention_with_lse_gradients_match_autograd_of_the_formula():
    from common.attention import attention_with_lse
    x = synthetic_qkv("gaussian", 1, 2, 5, 6, 3, dtype=torch.float64, seed=3)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_with_lse(a, b, c, 0.5, True, None, 20, 2), (q, k, v))


def test_exact_lse_in_half_precision_is_float32_and_finite_at_large_scores():
    x = synthetic_qkv("gaussian", 1, 2, 8, 8, 4, dtype=torch.float64, seed=4)
    q, k = x.q * 60, x.k * 60  # |scores| up to about 1e4
    reference = torch.logsumexp(common.attention_scores(q, k, True), -1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out, lse = common.get_attention("exact")(q.to(dtype), k.to(dtype), x.v.to(dtype), causal=True,
                                                 return_lse=True)
        assert out.dtype == dtype and lse.dtype == torch.float32 and torch.isfinite(lse).all()
        rounded = torch.logsumexp(common.attention_scores(q.to(dtype).double(), k.to(dtype).double(), True), -1)
        torch.testing.assert_close(lse.double(), rounded, rtol=1e-5, atol=1e-3)  # float32 sums of ~1e4 scores
    assert (reference - rounded).abs().max() < 200  # the rounding of q and k (bf16/fp16) moves scores of 1e4 by ~ 1e1


def test_exact_masked_path_gradients():
    x = synthetic_qkv("gaussian", 2, 1, 4, 4, 2, dtype=torch.float64, seed=5)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    padding = torch.tensor([[False] * 4, [True] + [False] * 3])
    additive = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = common.get_attention("exact")
    assert torch.autograd.gradcheck(lambda a, b, c: exact(a, b, c, causal=True, key_padding_mask=padding,
                                                          attn_mask=additive), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: exact(a, b, c, key_padding_mask=padding, return_lse=True),
                                    (q, k, v))


def test_key_padding_from_attn_mask():
    from common.attention import key_padding_from_attn_mask
    padded = torch.tensor([[False, False, True, True], [True, False, False, False]])
    allowed = ~padded[:, None, None, :]
    assert torch.equal(key_padding_from_attn_mask(allowed, 2, 3, 4, False, "m"), padded)
    assert torch.equal(key_padding_from_attn_mask(allowed.expand(2, 5, 3, 4), 2, 3, 4, False, "m"), padded)
    causal = allowed & common.causal_mask(3, 4)
    assert torch.equal(key_padding_from_attn_mask(causal, 2, 3, 4, True, "m"), padded)
    with pytest.raises(ValueError, match="^m: attn_mask is not a key-padding pattern"):
        key_padding_from_attn_mask(causal, 2, 3, 4, False, "m")  # a causal pattern without causal=True
    finfo_min = torch.zeros(2, 1, 3, 4).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_from_attn_mask(finfo_min, 2, 3, 4, True, "m"), padded)
    assert torch.equal(key_padding_from_attn_mask(torch.ones(4, dtype=torch.bool), 2, 3, 4, False, "m"),
                       torch.zeros(2, 4, dtype=torch.bool))  # rank 1, broadcast over batch, heads and queries
    per_head = allowed.expand(2, 2, 3, 4).clone()
    per_head[0, 1, :, 0] = False
    with pytest.raises(ValueError, match="^m: attn_mask is not a key-padding pattern"):
        key_padding_from_attn_mask(per_head, 2, 3, 4, False, "m")


def test_softmax_attention_reference_with_attn_mask_equals_sdpa():
    x = synthetic_qkv("gaussian", 2, 3, 5, 7, 4, dtype=torch.float64, seed=6)
    allowed = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    allowed[..., 1] = True
    additive = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    for mask in (allowed, additive):
        torch.testing.assert_close(common.softmax_attention(x.q, x.k, x.v, attn_mask=mask),
                                   F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask))


def test_empty_batch_with_masks_and_lse():
    q, k, v = torch.randn(0, 2, 3, 4), torch.randn(0, 2, 5, 4), torch.randn(0, 2, 5, 6)
    out, lse = common.get_attention("exact")(q, k, v, key_padding_mask=torch.zeros(0, 5, dtype=torch.bool),
                                             return_lse=True)
    assert out.shape == (0, 2, 3, 6) and lse.shape == (0, 2, 3) and lse.dtype == torch.float32
