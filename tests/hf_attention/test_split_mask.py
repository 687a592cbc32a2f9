"""hf_attention.split_mask: the 4D masks transformers builds (its own sdpa_mask / eager_mask, not hand-made copies)
rewritten as causal / key padding, and everything else kept whole for exact."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers.masking_utils import (and_masks, causal_mask_function, eager_mask, sdpa_mask,  # noqa: E402
                                        sliding_window_causal_mask_function)

from hf_attention import split_mask  # noqa: E402

# batch of 3: unpadded, left-padded by 2, right-padded by 1 (transformers' 2D mask: 1 = real token)
PADDING = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
PADDED_KEYS = ~PADDING


def test_no_mask_is_causal_from_the_module_for_several_queries_only():
    plan = split_mask(None, 2, 5, 5, is_causal=True)
    assert (plan.causal, plan.n_keys, plan.key_padding_mask, plan.attn_mask) == (True, 5, None, None)
    assert split_mask(None, 2, 5, 5, is_causal=False).causal is False
    decoding = split_mask(None, 2, 1, 9, is_causal=True)   # one new query reads the whole cache
    assert (decoding.causal, decoding.n_keys) == (False, 9)


def test_no_mask_with_more_keys_than_queries_keeps_the_first_queries_keys_as_sdpa_does():
    plan = split_mask(None, 1, 4, 16, is_causal=True)       # prefill into an empty static cache of 16 slots
    assert (plan.causal, plan.n_keys) == (True, 4)


@pytest.mark.parametrize("builder", ["sdpa", "eager"])
def test_causal_and_padding_from_transformers_masks(builder):
    if builder == "sdpa":
        mask = sdpa_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=PADDING, allow_is_causal_skip=False)
    else:
        mask = eager_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=PADDING, dtype=torch.float64)
        assert mask.dtype == torch.float64
    plan = split_mask(mask, 3, 6, 6, is_causal=True)
    assert plan.causal and plan.n_keys == 6 and plan.attn_mask is None
    assert torch.equal(plan.key_padding_mask, PADDED_KEYS)


def test_decoding_step_with_a_cache_and_left_padding_is_key_padding_without_causal():
    past = torch.cat([PADDING, torch.ones(3, 1, dtype=torch.bool)], dim=1)    # 6 cached + 1 new token
    mask = sdpa_mask(batch_size=3, q_length=1, kv_length=7, q_offset=6, attention_mask=past,
                     allow_is_causal_skip=False)
    plan = split_mask(mask, 3, 1, 7, is_causal=True)
    assert not plan.causal and plan.attn_mask is None
    assert torch.equal(plan.key_padding_mask, ~past)


def test_chunk_after_a_cache_is_bottom_right_causal():
    mask = sdpa_mask(batch_size=3, q_length=3, kv_length=6, q_offset=3, attention_mask=PADDING,
                     allow_is_causal_skip=False)
    plan = split_mask(mask, 3, 3, 6, is_causal=True)
    assert plan.causal and plan.n_keys == 6
    assert torch.equal(plan.key_padding_mask, PADDED_KEYS)


def test_static_cache_slots_no_query_reads_are_cut():
    # 3 queries at positions 2..4 of a 10-slot static cache: slots 5..9 are empty, read by nobody
    mask = sdpa_mask(batch_size=1, q_length=3, kv_length=10, q_offset=2, allow_is_causal_skip=False)
    plan = split_mask(mask, 1, 3, 10, is_causal=True)
    assert (plan.causal, plan.n_keys, plan.key_padding_mask, plan.attn_mask) == (True, 5, None, None)


def test_bidirectional_padding_is_key_padding_only():
    mask = sdpa_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=PADDING,
                     mask_function=lambda b, h, q, k: torch.ones_like(q + k, dtype=torch.bool),
                     allow_is_causal_skip=False)
    plan = split_mask(mask, 3, 6, 6, is_causal=False)
    assert not plan.causal and plan.attn_mask is None
    assert torch.equal(plan.key_padding_mask, PADDED_KEYS)
    unpadded = split_mask(torch.ones(1, 1, 6, 6, dtype=torch.bool), 3, 6, 6, is_causal=False)
    assert (unpadded.causal, unpadded.key_padding_mask) == (False, None)


def test_other_patterns_are_kept_whole_for_exact():
    window = sdpa_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=PADDING,
                       mask_function=and_masks(causal_mask_function, sliding_window_causal_mask_function(3)),
                       allow_is_causal_skip=False)
    bias = torch.linspace(-1, 0, 36, dtype=torch.float32).view(1, 1, 6, 6)                 # ALiBi-like
    per_head = torch.ones(3, 2, 6, 6, dtype=torch.bool)
    per_head[:, 1, :, 0] = False
    for mask in (window, bias, per_head):
        plan = split_mask(mask, 3, 6, 6, is_causal=True)
        assert plan.attn_mask is mask and not plan.causal and plan.key_padding_mask is None


def test_a_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="attention_mask must be 4D"):
        split_mask(torch.ones(3, 6, dtype=torch.bool), 3, 6, 6, is_causal=True)
    with pytest.raises(ValueError, match="attention_mask must be 4D"):
        split_mask(torch.ones(3, 1, 6, 5, dtype=torch.bool), 3, 6, 6, is_causal=True)
