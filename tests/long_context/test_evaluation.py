"""The end-to-end evaluation (issue 14): swapping ``exact`` reproduces the model's own metric; layer selection
patches exactly the layers named; the budgets, batches and CSV rows; ``evaluate --quick`` end to end."""
import csv
import json
import math

import pytest
import torch

import common
from long_context import evaluate as evaluate_script
from long_context.checkpoints import load_model
from long_context.evaluation import (AttentionTimer, labelled_budgets, layer_spec, make_batches, measure,
                                     plan_cells, evaluate_model)
from long_context.training import recall_metric


def test_exact_swap_reproduces_the_models_own_metric(recall_model):
    model, info = recall_model
    task = info["task"].with_length(128)
    own = recall_metric(model, task, batches=2, batch_size=8, seed=5)["accuracy"]
    batches = make_batches("recall", 128, 2, 8, seed=5, task=info["task"])
    as_loaded = measure(model, "recall", batches)["metric"]
    for layers in (None, "first:1", [1]):
        model.set_attention("exact", layers=layers)
        assert abs(measure(model, "recall", batches)["metric"] - own) <= 1e-5
    assert abs(as_loaded - own) <= 1e-5
    rows = evaluate_model(model, "recall", info["task"], [128], ["exact"], batches=2, batch_size=8, seed=5)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and abs(rows[0]["metric"] - own) <= 1e-5


def test_exact_swap_reproduces_the_lm_perplexity(tiny_lm_path):
    model, _ = load_model(tiny_lm_path, "lm")
    batches = make_batches("lm", 64, 2, 2, seed=1)
    tokens, targets = batches[0]
    with torch.no_grad():
        own = math.exp(sum(model(x, y)[1].item() for x, y in batches) / len(batches))
    model.set_attention("exact", layers="last:1")
    assert abs(measure(model, "lm", batches)["metric"] / own - 1) <= 1e-5
    assert tokens.shape == targets.shape == (2, 64) and torch.equal(tokens[:, 1:], targets[:, :-1])


def test_rows_patch_exactly_the_layers_named(recall_model, monkeypatch):
    model, info = recall_model
    seen = []
    real = measure

    def spy(model, kind, batches, dtype="float32"):
        seen.append(model.layer_attention_names())
        return real(model, kind, batches[:1], dtype)

    monkeypatch.setattr("long_context.evaluation.measure", spy)
    rows = evaluate_model(model, "recall", info["task"], [64], ["uniform"], budgets=("mid",), layers="last:1",
                          sweep=("first",), batches=1, batch_size=2)
    assert [(r["method"], r["layers"], r["patched_layers"]) for r in rows] == \
        [("exact", "all", 2), ("uniform", "last:1", 1), ("uniform", "first:1", 1)]
    assert seen == [["exact", "exact"], ["exact", "uniform"], ["uniform", "exact"]]
    assert model.layer_attention_names() == ["exact", "exact"]  # left as loaded


def test_cells_and_budgets():
    assert labelled_budgets("exact", 1024, 0) == [("exact", {})]
    knn = labelled_budgets("knn", 1024, 0)
    assert [label for label, _ in knn] == ["low", "mid", "high"]
    assert [opts for _, opts in knn] == common.budget_options("knn", 1024, 0)
    cells = plan_cells(["exact", "knn", "srf"], 1024, 4, 0, sweep=("first", "last"))
    assert len(cells) == 2 * 3 + 2 * 2 * 3
    assert [c.layers for c in cells if c.method == "srf" and c.layers != "all"] == \
        ["first:1", "first:2", "first:3", "last:1", "last:2", "last:3"]
    extra = plan_cells(["exact", "knn"], 1024, 2, 7, budgets=("low",), extra=(("knn", {"index": "torch", "k": 9}),))
    assert [(c.budget, c.options) for c in extra] == [("low", common.budget_options("knn", 1024, 7)[0]),
                                                     ("extra", {"index": "torch", "k": 9, "seed": 7})]
    assert layer_spec("all") is None and layer_spec("first:2") == "first:2" and layer_spec("0,2") == [0, 2]
    with pytest.raises(ValueError, match="layers"):
        layer_spec("middle")
    with pytest.raises(ValueError, match="sweep"):
        plan_cells(["knn"], 64, 2, 0, sweep=("middle",))


def test_recall_batches_are_seeded_and_the_same_for_every_method(recall_model):
    _, info = recall_model
    a = make_batches("recall", 96, 2, 3, seed=4, task=info["task"])
    b = make_batches("recall", 96, 2, 3, seed=4, task=info["task"])
    assert all(torch.equal(x, y) for (xa, ya), (xb, yb) in zip(a, b) for x, y in ((xa, xb), (ya, yb)))
    assert a[0][0].shape == (3, 96)
    with pytest.raises(ValueError, match="kind"):
        make_batches("vision", 96, 1, 1, seed=0)


def test_attention_timer_times_every_layer_once_per_forward(recall_model):
    model, info = recall_model
    tokens, _ = make_batches("recall", 64, 1, 2, seed=0, task=info["task"])[0]
    with torch.no_grad(), AttentionTimer(model) as timer:
        model(tokens)
    assert len(timer.spans) == model.config.n_layer and timer.seconds() > 0
    assert not model.blocks[0].attn.attention._forward_hooks  # hooks removed


def test_failing_method_is_a_row_and_the_run_goes_on(recall_model, monkeypatch):
    model, info = recall_model

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(common.method_class("uniform"), "attend", broken)
    rows = evaluate_model(model, "recall", info["task"], [64], ["uniform", "reformer"], budgets=("low",),
                          batches=1, batch_size=2)
    status = {r["method"]: r["status"] for r in rows}
    assert status == {"exact": "ok", "uniform": "error", "reformer": "ok"}
    assert "boom" in next(r["message"] for r in rows if r["method"] == "uniform")
    skipped = evaluate_model(model, "recall", info["task"], [64], ["reformer"], budgets=("low",), batches=1,
                             batch_size=2, deadline=0.0)
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]


def test_evaluate_quick_writes_the_csv(tmp_path, tiny_lm_path):
    rows = evaluate_script.main(["--quick", "--methods", "uniform", "--budgets", "low", "high", "--sweep", "first",
                                 "--lm-checkpoint", str(tiny_lm_path), "--out", str(tmp_path), "--threads", "1"])
    with (tmp_path / "long_context_eval.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    # recall at n = 128, 512 and the LM at n = 256 capped to its block (64): exact + 2 budgets, and the
    # sweep's first:1 at the largest n of each model
    cells = [(r["model"], r["n"], r["method"], r["budget"], r["layers"]) for r in written]
    assert cells == [("recall", "128", "exact", "exact", "all"), ("recall", "128", "uniform", "low", "all"),
                     ("recall", "128", "uniform", "high", "all"),
                     ("recall", "512", "exact", "exact", "all"), ("recall", "512", "uniform", "low", "all"),
                     ("recall", "512", "uniform", "high", "all"), ("recall", "512", "uniform", "mid", "first:1"),
                     ("lm", "64", "exact", "exact", "all"), ("lm", "64", "uniform", "low", "all"),
                     ("lm", "64", "uniform", "high", "all"), ("lm", "64", "uniform", "mid", "first:1")]
    for r in written:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["dtype"] == "float32"
        metric, exact = float(r["metric"]), float(r["exact_metric"])
        if r["model"] == "recall":
            assert 0 <= metric <= 1 and r["metric_name"] == "accuracy"
            assert float(r["metric_change"]) == pytest.approx(metric - exact)
        else:
            assert metric > 1 and r["metric_name"] == "perplexity"
            assert float(r["metric_change"]) == pytest.approx(metric / exact - 1)
        assert float(r["attention_time_s"]) > 0 and float(r["forward_time_s"]) >= float(r["attention_time_s"])
        assert float(r["attention_speedup"]) == pytest.approx(float(r["exact_attention_time_s"]) /
                                                              float(r["attention_time_s"]))
        options = json.loads(r["options"])
        assert options == {} if r["method"] == "exact" else options["seed"] == 0 and options["num_samples"] >= 1
    exact_recall = [float(r["metric"]) for r in written if r["model"] == "recall" and r["method"] == "exact"]
    assert all(m > 0.8 for m in exact_recall)  # the committed model at n = 128 and 512


def test_evaluate_script_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no long-context checkpoint at .*absent.pth"):
        evaluate_script.main(["--quick", "--model", "lm", "--lm-checkpoint", str(tmp_path / "absent.pth")])
    # without --model, a missing checkpoint is said and the others are evaluated
    rows = evaluate_script.main(["--quick", "--methods", "exact", "--lm-checkpoint", str(tmp_path / "absent.pth"),
                                 "--out", str(tmp_path), "--threads", "1"])
    assert {r["model"] for r in rows} == {"recall"}
    assert "no lm checkpoint at" in capsys.readouterr().out
