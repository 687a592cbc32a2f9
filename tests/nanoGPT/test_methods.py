"""One training step of the GPT with every registered attention method that supports causal attention."""
import csv
import json
import math

import pytest
import torch

import common
from common import registry
from nanoGPT.checkpoint import load_model
from nanoGPT.train import train

from .conftest import tiny_config


@pytest.mark.parametrize("name", common.available())
def test_one_training_step(name, tmp_path):
    cls = common.method_class(name)
    args = [f"--attention={name}", "--max_iters=1", "--eval_iters=1", "--warmup_iters=0"]
    if not (cls.supports_causal and cls.trainable):
        with pytest.raises(ValueError, match=name):
            train(tiny_config(tmp_path, *args))
        return
    result = train(tiny_config(tmp_path, *args))
    assert result["iter_num"] == 1 and torch.isfinite(torch.tensor(result["history"][-1]["train_loss"]))
    trained, _ = load_model(tmp_path)
    torch.manual_seed(1337)  # the run's seed: rebuild its initial weights to see that the step moved them
    initial = type(trained)(trained.config)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert all(moved), f"{name}: a training step left some parameters unchanged"


@pytest.mark.parametrize("flag, match", [("supports_causal", "causal"), ("trainable", "inference-only")])
def test_methods_that_cannot_train_are_refused(flag, match, monkeypatch, tmp_path):
    class Limited(common.ExactAttention):
        pass

    setattr(Limited, flag, False)
    monkeypatch.setitem(registry._REGISTRY, "limited_test", Limited)
    with pytest.raises(ValueError, match=f"limited_test.*{match}"):
        train(tiny_config(tmp_path, "--attention=limited_test"))


def read_png(path):
    """The pixels of a PNG (rows, columns, channels); matplotlib raises on a broken file."""
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_compare_training_writes_curves_for_each_method(tmp_path):
    from nanoGPT import compare_training

    out = tmp_path / "assets"
    args = ["--quick", "--methods", "exact", "uniform", "--max_iters", "4", "--eval_interval", "2",
            "--out", str(out), "--runs_dir", str(tmp_path / "runs"), "--no-progress"]
    rows = compare_training.main(args)
    assert [(r["method"], r["iter"]) for r in rows] == [(m, i) for m in ("exact", "uniform") for i in (0, 2, 4)]
    # Same seed: same initial weights and batches, so the iteration-0 losses agree up to the attention.
    assert rows[0]["val_loss"] == pytest.approx(rows[3]["val_loss"], abs=0.05)
    with (out / "perplexity_training_quick.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == compare_training.CSV_FIELDS
    assert [(r["method"], int(r["iter"])) for r in table] == [(r["method"], r["iter"]) for r in rows]
    for r in table:
        val = float(r["val_loss"])
        assert 0 < val < math.log(65) + 0.5 and 0 < float(r["train_loss"]) < math.log(65) + 0.5
        assert float(r["val_perplexity"]) == pytest.approx(math.exp(val))
        assert json.loads(r["options"]) == compare_training.run_options(r["method"], 32, None, 1337)
    assert json.loads(table[-1]["options"])["seed"] == 1337  # uniform is randomised: seeded with --seed
    pixels = read_png(out / "perplexity_training_quick.png")
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0
    merged = compare_training.main(["--quick", "--from_csv", str(out / "perplexity_training_quick.csv"),
                                    "--out", str(tmp_path / "replot")])
    assert [(r["method"], r["iter"], r["val_loss"]) for r in merged] == \
        [(r["method"], r["iter"], r["val_loss"]) for r in rows]
