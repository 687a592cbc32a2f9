"""The real Shakespeare q/k/v source: the small committed model, its manifest, and the comparison's input."""
import json
import shutil

import pytest
import torch

from common import compare, data
from nanoGPT import quick_model, qkv_source
from nanoGPT.capture_qkv import capture_qkv
from nanoGPT.checkpoint import CheckpointError
from nanoGPT.data.shakespeare_char.prepare import INPUT
from nanoGPT.data_loader import load_split


def test_the_corpus_ships_with_the_repo():
    text = INPUT.read_text(encoding="utf-8")  # Karpathy's tiny Shakespeare (char-rnn data)
    assert len(text) == 1115394 and text.startswith("First Citizen:")


def test_small_model_is_committed_with_its_manifest():
    manifest = json.loads(quick_model.SMALL_MANIFEST.read_text())
    assert manifest["command"] == quick_model.SMALL_COMMAND and manifest["overrides"] == quick_model.SMALL_OVERRIDES
    assert manifest["bytes"] == quick_model.SMALL_MODEL.stat().st_size < 600 * 1024  # a few hundred KB
    assert 1.0 < manifest["best_val_loss"] < 2.8  # trained: far below the uniform guess ln(65) = 4.17
    model, meta = quick_model.get_small_model()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 2, 64)
    assert meta["vocab_size"] == model.config.vocab_size and meta["manifest"] == manifest
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training


def test_small_model_refuses_a_file_that_differs_from_its_manifest(tmp_path):
    path = tmp_path / quick_model.SMALL_MODEL.name
    shutil.copy(quick_model.SMALL_MANIFEST, path.with_suffix(".json"))
    raw = bytearray(quick_model.SMALL_MODEL.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        quick_model.get_small_model(path=path)
    with pytest.raises(FileNotFoundError, match="make_small_model"):
        quick_model.get_small_model(path=tmp_path / "none.pth")


def test_shakespeare_qkv_joins_consecutive_validation_blocks():
    x = qkv_source.shakespeare_qkv(100, model="small", dtype=torch.float64)
    assert x.q.shape == x.k.shape == x.v.shape == (1, 2, 100, 32) and x.q.dtype == torch.float64
    model, _ = quick_model.get_small_model()
    block = model.config.block_size
    ids = torch.as_tensor(load_split("val")[: 2 * block].astype("int64")).view(2, block)
    q, k, v = capture_qkv(model, ids, layer=-1)
    for joined, blocks in ((x.q, q), (x.k, k), (x.v, v)):
        assert torch.allclose(joined[0, :, :block].float(), blocks[0])
        assert torch.allclose(joined[0, :, block:100].float(), blocks[1, :, : 100 - block])
    with pytest.raises(ValueError, match="model must be one of"):
        qkv_source.shakespeare_qkv(10, model="large")
    with pytest.raises(ValueError, match="n must be a positive int"):
        qkv_source.shakespeare_qkv(0, model="small")


@pytest.mark.slow
def test_quick_comparison_takes_shakespeare_from_the_small_model_and_trains_nothing(tmp_path, monkeypatch):
    assert "shakespeare" in data.input_sources(default_only=True)

    def no_training(*args, **kwargs):
        raise AssertionError("--quick must not train the quick model")

    monkeypatch.setattr(qkv_source, "get_quick_model", no_training)
    rows = compare.main(["--quick", "--n", "64", "128", "--inputs", "shakespeare", "--methods", "performer",
                         "--repeats", "1", "--min-time", "0", "--out", str(tmp_path), "--no-progress"])
    assert {(r["input"], r["method"], r["causal"]) for r in rows} == \
        {("shakespeare", "exact", False), ("shakespeare", "performer", False)}
    assert sorted({r["n"] for r in rows}) == [64, 128]
    assert all(0 < r["rel_fro"] < 2 for r in rows if r["method"] == "performer")
