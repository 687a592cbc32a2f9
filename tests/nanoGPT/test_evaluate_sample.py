"""Evaluation reproduces training's val loss; sampling with cache equals without; q/k/v capture; quick model."""
import csv

import pytest
import torch

import common
from nanoGPT import evaluate as evaluate_module
from nanoGPT import quick_model, sample as sample_module
from nanoGPT.capture_qkv import capture_qkv
from nanoGPT.checkpoint import load_model
from nanoGPT.evaluate import evaluate


def test_evaluate_with_exact_reproduces_training_val_loss(tiny_run):
    result, out_dir = tiny_run
    model, meta = load_model(out_dir)
    cfg = meta["config"]
    val = evaluate(model, "val", cfg["batch_size"], cfg["eval_iters"], cfg["eval_seed"])
    assert val["loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    assert val["perplexity"] == pytest.approx(torch.tensor(val["loss"]).exp().item())
    # The CLI defaults to the run's batch size and eval_iters, so it reports the same number.
    (row,) = evaluate_module.main([f"--out_dir={out_dir}"])
    assert row["method"] == "exact" and row["loss"] == pytest.approx(result["val_loss"], abs=1e-6)


def test_evaluate_swaps_attention_and_writes_table(tiny_run, tmp_path):
    result, out_dir = tiny_run
    table = tmp_path / "swap.csv"
    # --attention=all over two methods (every method is trained in test_methods.py; swapping all is slow).
    rows = evaluate_module.main([f"--out_dir={out_dir}", "--attention=all", f"--csv={table}",
                                "--max_batches=1", "--methods=['exact', 'uniform']"])
    assert [r["method"] for r in rows] == ["exact"] + ["uniform"] * len(common.method_class("uniform").budgets(32))
    exact_row = next(r for r in rows if r["method"] == "exact")
    model, meta = load_model(out_dir)
    one_batch = evaluate(model, "val", meta["config"]["batch_size"], 1, 0)
    assert exact_row["loss"] == pytest.approx(one_batch["loss"], abs=1e-6)
    assert all(r["loss"] > 0 for r in rows)
    with table.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    (swapped,) = evaluate_module.main([f"--out_dir={out_dir}", "--attention=uniform",
                                       "--attention_options={'num_samples': 1, 'seed': 0}"])
    # One uniformly sampled key per query throws away the context: the loss must get worse.
    assert swapped["loss"] > result["val_loss"]


def test_sample_with_cache_equals_without(tiny_run):
    _, out_dir = tiny_run
    args = [f"--out_dir={out_dir}", "--start=ROMEO:", "--max_new_tokens=40", "--num_samples=2", "--seed=3"]
    cached = sample_module.main(args + ["--use_cache=True"])
    uncached = sample_module.main(args + ["--use_cache=False"])
    assert cached == uncached
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in cached)


def test_capture_qkv_are_the_layer_inputs(tiny_run):
    _, out_dir = tiny_run
    model, meta = load_model(out_dir)
    text = "First Citizen:\nBefore we proceed"
    q, k, v = capture_qkv(model, text, layer=0, meta=meta)
    cfg = model.config
    assert q.shape == k.shape == v.shape == (1, cfg.n_head, len(text), cfg.n_embd // cfg.n_head)
    idx = torch.tensor([[meta["stoi"][c] for c in text]])
    with torch.no_grad():
        x = model.token_emb(idx) + model.pos_emb(torch.arange(len(text)))
        expected = model.blocks[0].attn.split_heads(model.blocks[0].ln_attn(x))
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got, want)
    q_last, _, _ = capture_qkv(model, idx[0], layer=-1)
    assert not torch.allclose(q_last, q)
    with pytest.raises(ValueError, match="layer"):
        capture_qkv(model, idx, layer=cfg.n_layer)
    with pytest.raises(ValueError, match="meta"):
        capture_qkv(model, text, layer=0)


def test_quick_model_trains_once_then_loads(tmp_path, monkeypatch):
    """Shrunk to 3 iterations: trained on first use, loaded (not retrained) afterwards."""
    monkeypatch.setattr(quick_model, "QUICK_DIR", tmp_path / "quick")
    monkeypatch.setattr(quick_model, "QUICK_ITERS", 3)
    monkeypatch.setattr(quick_model, "QUICK_OVERRIDES", ["--eval_iters=1"])
    model, meta = quick_model.get_quick_model(progress=False)
    assert meta["iter_num"] == 3 and meta["config"]["attention"] == "exact"
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (4, 128, 64)
    stamp = (tmp_path / "quick" / "ckpt.pt").stat().st_mtime_ns
    quick_model.get_quick_model(progress=False)
    assert (tmp_path / "quick" / "ckpt.pt").stat().st_mtime_ns == stamp
