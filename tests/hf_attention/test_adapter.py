"""The transformers adapter on tiny random models: ``exact`` reproduces the models' own sdpa and eager attention,
every method with exact options matches them to its tolerance (encoder, GQA decoder, generation with the KV cache),
the others run, a per-layer choice swaps exactly the named layers, and what cannot be honoured is refused."""
import pytest
import torch

pytest.importorskip("transformers")
import common  # noqa: E402
import hf_attention  # noqa: E402

from .conftest import generate, rel_error, tiny_bert, tiny_llama, tokens  # noqa: E402

LENGTH, NEW = 12, 5                                    # prompt length and generated tokens
EXACT_OPTIONS = [n for n in common.methods() if common.method_class(n).exact_options(LENGTH + NEW) is not None]
NO_EXACT_OPTIONS = [n for n in common.methods() if n not in EXACT_OPTIONS]


def swap(model, name):
    model.set_attn_implementation(name)
    return model


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_exact_reproduces_the_encoder(reference):
    hf_attention.register(["exact"])
    model = tiny_bert()
    ids = tokens(3, LENGTH)
    with torch.no_grad():
        expected = swap(model, reference)(ids).last_hidden_state
        got = swap(model, "exact")(ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_exact_reproduces_gqa_decoding_with_the_cache(reference):
    choice = hf_attention.register(["exact"])["exact"]
    model = tiny_llama()
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    ids = tokens(2, LENGTH)
    with torch.no_grad():
        expected_ids, expected_logits = generate(swap(model, reference), ids, new_tokens=NEW)
        choice.calls.clear()
        got_ids, got_logits = generate(swap(model, "exact"), ids, new_tokens=NEW)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert choice.calls == {(0, "exact"): NEW, (1, "exact"): NEW}      # prefill + NEW - 1 single-token steps


@pytest.mark.filterwarnings("ignore::UserWarning")   # exact options sized for the full length clamp while decoding
@pytest.mark.parametrize("name", EXACT_OPTIONS)
def test_methods_under_exact_options_match_sdpa(name):
    cls = common.method_class(name)
    choice = hf_attention.register([name], options={name: cls.exact_options(LENGTH + NEW)})[name]
    encoder, decoder = tiny_bert(dtype=torch.float64), tiny_llama(dtype=torch.float64)
    ids = tokens(2, LENGTH)
    with torch.no_grad():
        expected_encoded = swap(encoder, "sdpa")(ids).last_hidden_state
        encoded = swap(encoder, name)(ids).last_hidden_state
        expected_ids, expected_logits = generate(swap(decoder, "sdpa"), ids, new_tokens=NEW)
        got_ids, got_logits = generate(swap(decoder, name), ids, new_tokens=NEW)
    assert rel_error(encoded, expected_encoded) <= cls.exact_tolerance
    assert torch.equal(got_ids, expected_ids)
    assert rel_error(got_logits, expected_logits) <= cls.exact_tolerance
    assert choice.calls == {(0, name): 1 + NEW, (1, name): 1 + NEW}   # encoder once, decoder NEW times per layer


@pytest.mark.parametrize("name", NO_EXACT_OPTIONS)
def test_methods_without_exact_options_run_in_every_layer(name):
    choice = hf_attention.register([name])[name]
    encoder, decoder = tiny_bert(), tiny_llama()
    ids = tokens(2, LENGTH)
    with torch.no_grad():
        encoded = swap(encoder, name)(ids).last_hidden_state
        expected = swap(encoder, "sdpa")(ids).last_hidden_state
        got_ids, got_logits = generate(swap(decoder, name), ids, new_tokens=NEW)
    assert encoded.shape == expected.shape and torch.isfinite(encoded).all()
    assert not torch.equal(encoded, expected)                           # an approximation did run
    assert got_ids.shape == (2, LENGTH + NEW) and torch.isfinite(got_logits).all()
    assert choice.calls == {(0, name): 1 + NEW, (1, name): 1 + NEW}


def test_per_layer_choice_swaps_exactly_the_named_layers():
    choice = hf_attention.register_layers("uniform_layer1", {1: ("uniform", {"num_samples": 2})})
    model = tiny_llama(n_layers=3)
    ids = tokens(2, LENGTH)
    with torch.no_grad():
        expected = swap(model, "sdpa")(ids, output_hidden_states=True).hidden_states
        got = swap(model, "uniform_layer1")(ids, output_hidden_states=True).hidden_states
    assert choice.calls == {(0, "exact"): 1, (1, "uniform"): 1, (2, "exact"): 1}
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)   # after layer 0 (exact)
    assert rel_error(got[2], expected[2]) > 1e-3                            # layer 1 sampled 2 keys per query
    assert choice.method(1).num_samples == 2 and choice.method(1).seed == 1  # seed 0 + layer index


def test_per_layer_options_and_default():
    choice = hf_attention.register_layers("knn_first", {0: ("knn", {"k": 4})}, default=("sblocal", {"local_size": 4}))
    assert choice.method_for(0) == ("knn", {"k": 4}) and choice.method_for(5) == ("sblocal", {"local_size": 4})
    assert choice.method(0).k == 4 and choice.method(3).local_size == 4 and choice.method(3).seed == 3


class FakeAttention(torch.nn.Module):
    """The attributes transformers' attention modules give the attention function."""

    def __init__(self, layer_idx=0, is_causal=True):
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, is_causal


def qkv(batch=2, heads=4, n=6, dim=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, h, n, dim, generator=g) for h in (heads, heads // 2, heads // 2)]


def test_the_output_is_in_transformers_layout_and_gqa_equals_repeated_heads():
    choice = hf_attention.register(["exact"])["exact"]
    q, k, v = qkv()
    out, weights = choice(FakeAttention(), q, k, v, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    assert weights is None and out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_refusals_name_the_method_and_the_argument():
    knn = hf_attention.register(["knn"])["knn"]
    q, k, v = qkv()
    window = torch.ones(6, 6, dtype=torch.bool).tril().triu(-2).view(1, 1, 6, 6)     # a sliding window
    with pytest.raises(ValueError, match="^knn: the model's attention mask is neither causal"):
        knn(FakeAttention(), q, k, v, window)
    with pytest.raises(ValueError, match="^knn: attention dropout"):
        knn(FakeAttention(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="^knn: the model passes softcap"):
        knn(FakeAttention(), q, k, v, None, softcap=30.0)
    per_layer = hf_attention.register_layers("knn_layer0", {0: "knn"})
    with pytest.raises(ValueError, match="no layer_idx"):
        per_layer(FakeAttention(layer_idx=None), q, k, v, None)


@pytest.mark.parametrize("name", ["sdpa", "eager", "flash_attention_2", "flex_attention", "org/kernel", "a|b", ""])
def test_transformers_own_names_are_reserved(name):
    with pytest.raises(ValueError, match="cannot register"):
        hf_attention.register_layers(name, {0: "knn"})


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        hf_attention.register(["nope"])
    with pytest.raises(ValueError, match="options given for methods not registered"):
        hf_attention.register(["exact"], options={"knn": {"k": 2}})
    with pytest.raises(ValueError, match="knn: unknown option"):
        hf_attention.register_layers("knn_bad", {0: ("knn", {"kk": 2})}).method(0)
    with pytest.raises(ValueError, match="must name at least one layer"):
        hf_attention.register_layers("empty", {})
