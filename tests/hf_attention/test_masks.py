"""Padding through the adapter: a padded batch (right-padded encoder, left-padded GQA decoder generating with the KV
cache) equals the unpadded sequences run one by one on the real positions; ``exact`` reproduces the models' sdpa and
eager attention on padded batches; the content of padded tokens never reaches a real position, for every method;
a mask that is not causal + padding (a sliding window) runs in ``exact`` and is refused by the others."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
import common  # noqa: E402
import hf_attention  # noqa: E402

from .conftest import generate, rel_error, tiny_bert, tiny_llama, tokens  # noqa: E402
from .test_adapter import EXACT_OPTIONS, swap  # noqa: E402

LENGTHS = (9, 4, 6)        # a batch of three sequences, padded to 9
NEW = 4


def padded(side: str, pad_ids=None):
    """(ids, 2D attention mask with 1 = real token, the unpadded sequences) for LENGTHS, padded on ``side``."""
    width = max(LENGTHS)
    sequences = [tokens(1, n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids = tokens(len(LENGTHS), width, seed=99) if pad_ids is None else torch.full((len(LENGTHS), width), pad_ids)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for b, seq in enumerate(sequences):
        real = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[b, real], mask[b, real] = seq, 1
    return ids, mask, sequences


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_exact_reproduces_a_padded_encoder_batch(reference):
    hf_attention.register(["exact"])
    model = tiny_bert()
    ids, mask, _ = padded("right")
    with torch.no_grad():
        expected = swap(model, reference)(ids, attention_mask=mask).last_hidden_state
        got = swap(model, "exact")(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_exact_reproduces_left_padded_gqa_generation(reference):
    hf_attention.register(["exact"])
    model = tiny_llama()
    ids, mask, _ = padded("left")
    with torch.no_grad():
        expected_ids, expected_logits = generate(swap(model, reference), ids, mask, new_tokens=NEW)
        got_ids, got_logits = generate(swap(model, "exact"), ids, mask, new_tokens=NEW)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")   # exact options sized for the longest sequence clamp
@pytest.mark.parametrize("name", EXACT_OPTIONS)
def test_padded_batch_equals_the_sequences_one_by_one(name):
    cls = common.method_class(name)
    hf_attention.register([name], options={name: cls.exact_options(max(LENGTHS) + NEW)})
    encoder, decoder = swap(tiny_bert(dtype=torch.float64), name), swap(tiny_llama(dtype=torch.float64), name)
    with torch.no_grad():
        ids, mask, sequences = padded("right")
        encoded = encoder(ids, attention_mask=mask).last_hidden_state
        for b, seq in enumerate(sequences):
            alone = encoder(seq[None]).last_hidden_state[0]
            assert rel_error(encoded[b, :len(seq)], alone) <= cls.exact_tolerance
        ids, mask, sequences = padded("left")
        generated, logits = generate(decoder, ids, mask, new_tokens=NEW)
        for b, seq in enumerate(sequences):
            alone_ids, alone_logits = generate(decoder, seq[None], new_tokens=NEW)
            assert torch.equal(generated[b, -NEW:], alone_ids[0, -NEW:])
            assert rel_error(logits[b], alone_logits[0]) <= cls.exact_tolerance


@pytest.mark.filterwarnings("ignore::UserWarning")   # default budgets larger than a short prefix clamp
@pytest.mark.parametrize("name", common.methods())
def test_padded_tokens_never_reach_a_real_position(name):
    """Same seed, same shapes, only the padded token ids differ: every real position is bit for bit the same, for
    every method (padded keys enter no normaliser, index, bucket or sample)."""
    choice = hf_attention.register([name])[name]
    encoder, decoder = swap(tiny_bert(), name), swap(tiny_llama(), name)
    runs = []
    for pad_id in (3, 7):
        choice.reseed(0)
        with torch.no_grad():
            ids, mask, _ = padded("right", pad_ids=pad_id)
            encoded = encoder(ids, attention_mask=mask).last_hidden_state[mask.bool()]
            ids, mask, _ = padded("left", pad_ids=pad_id)
            generated, logits = generate(decoder, ids, mask, new_tokens=NEW)
        runs.append((encoded, generated[:, -NEW:], logits))
    for first, second in zip(*runs):
        assert torch.isfinite(first.float()).all() and torch.equal(first, second)


def tiny_mistral_with_a_sliding_window():
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=4, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_a_sliding_window_mask_runs_in_exact_and_is_refused_by_the_others():
    hf_attention.register(["exact", "knn"])
    model = tiny_mistral_with_a_sliding_window()
    ids = tokens(2, 10)
    with torch.no_grad():
        expected = swap(model, "sdpa")(ids).logits
        got = swap(model, "exact")(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="^knn: the model's attention mask is neither causal"):
            swap(model, "knn")(ids)
