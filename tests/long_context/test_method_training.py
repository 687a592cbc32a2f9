"""Training the long-context models with a method itself (issue 14: kNN and SRF were trained with their
approximation): the loss falls, the checkpoint's config and manifest name the method, the checkpoint evaluated with
its method reproduces the metric its training recorded, and a name that cannot train is refused clearly."""
import json

import pytest
import torch

import common
from long_context import evaluate as evaluate_script
from long_context import train_lm as train_lm_script
from long_context import train_recall as train_recall_script
from long_context.checkpoints import load_model
from long_context.evaluation import evaluate_model, trained_attention
from long_context.training import RecallTrainConfig, attention_options, recall_metric, train_recall
from nanoGPT.model import GPT

# the device indexes knn trains with on a GPU (faiss is CPU-only): a routed block index and an exact top-k
METHODS = {"knn_ivf_blocks": ("knn", {"index": "ivf_blocks", "nprobe": 2, "num_samples": 8}),
           "knn_torch": ("knn", {"index": "torch", "k": 8, "num_samples": 8}),
           "srf": ("srf", {"nb_features": 32})}


@pytest.mark.parametrize("case", list(METHODS))
def test_a_small_recall_task_trains_with_the_method(case):
    name, options = METHODS[case]
    cfg = RecallTrainConfig(lengths=(24,), pairs=1, queries=1, n_keys=4, n_values=4, n_distractors=4,
                            key_curriculum=(), batch_size=16, max_iters=20, eval_interval=10, eval_batches=2,
                            attention=name, attention_options=options)
    assert cfg.attention_options == {**options, "seed": 0}  # seeded: the run repeats
    model, history = train_recall(cfg, progress=False)
    assert model.layer_attention_names() == [name, name]
    losses = [row["loss_n24"] for row in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("case", ["knn_ivf_blocks", "srf"])
def test_fine_tune_with_a_method_records_it_and_the_checkpoint_reproduces_its_metric(tmp_path, case):
    name, options = METHODS[case]
    out = tmp_path / f"recall_{case}.pth"
    train_recall_script.main(["--init", "long_context/checkpoints/recall_exact.pth", "--lengths", "48", "64",
                              "--max-iters", "4", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "2",
                              "--attention", name, "--attention-options", json.dumps(options),
                              "--weights", "float32", "--threads", "1", "--out", str(out)])
    manifest = json.loads(out.with_suffix(".pth.json").read_text())
    assert manifest["trained_attention"] == {"name": name, "options": {**options, "seed": 0}}
    assert manifest["model_config"]["attention"] == name
    assert manifest["fine_tuned_from"]["command"] == load_model("long_context/checkpoints/recall_exact.pth")[1][
        "manifest"]["command"]  # the exact-trained parent's record
    model, info = load_model(out, "recall")
    assert model.layer_attention_names() == [name, name]  # loads running the method it was trained with
    assert trained_attention(model) == (name, {**options, "seed": 0})
    final, cfg = info["manifest"]["final"], info["manifest"]["train_config"]
    for n in (48, 64):
        # the training's own evaluation (held-out seeded batches), on the freshly loaded checkpoint
        again = recall_metric(model, info["task"].with_length(n), cfg["eval_batches"], cfg["batch_size"],
                              seed=10_000 + cfg["seed"])
        assert again["accuracy"] == final[f"accuracy_n{n}"]
        assert again["loss"] == pytest.approx(final[f"loss_n{n}"], rel=1e-5)
        # the evaluation command's 'trained' row draws the same batches: the same accuracy, beside exact's
        rows = evaluate_model(model, "recall", info["task"], [n], ["exact"], trained=trained_attention(model),
                              batches=cfg["eval_batches"], batch_size=cfg["batch_size"], seed=10_000 + cfg["seed"])
        assert [(r["method"], r["budget"], r["status"]) for r in rows] == [("exact", "exact", "ok"),
                                                                          (name, "trained", "ok")]
        assert rows[1]["metric"] == final[f"accuracy_n{n}"]
        assert rows[1]["exact_metric"] == rows[0]["metric"]


def test_evaluate_adds_the_trained_row_and_names_the_checkpoint(tmp_path):
    ckpt = tmp_path / "recall_srf.pth"
    train_recall_script.main(["--init", "long_context/checkpoints/recall_exact.pth", "--lengths", "32",
                              "--max-iters", "1", "--batch-size", "2", "--eval-batches", "1", "--attention", "srf",
                              "--attention-budget", "low", "--threads", "1", "--out", str(ckpt)])
    rows = evaluate_script.main(["--model", "recall", "--recall-checkpoint", str(ckpt), "--n", "64", "--methods",
                                 "srf", "--budgets", "mid", "--batches", "1", "--batch-size", "2", "--threads", "1",
                                 "--out", str(tmp_path)])
    low = common.budget_options("srf", 32, 0)[0]
    assert [(r["method"], r["budget"], json.loads(r["options"])) for r in rows] == [
        ("exact", "exact", {}), ("srf", "trained", low), ("srf", "mid", common.budget_options("srf", 64, 0)[1])]
    assert {r["checkpoint"] for r in rows} == {"recall_srf.pth"} and all(r["status"] == "ok" for r in rows)


def test_train_lm_with_a_method_records_it(tmp_path):
    out = tmp_path / "lm_knn.pth"
    options = METHODS["knn_ivf_blocks"][1]
    train_lm_script.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--threads", "1",
                          "--attention", "knn", "--attention-options", json.dumps(options)])
    model, info = load_model(out, "lm")
    assert model.layer_attention_names() == ["knn", "knn"]
    assert info["manifest"]["trained_attention"] == {"name": "knn", "options": {**options, "seed": 0}}
    assert info["manifest"]["train_config"]["attention"] == "knn"
    final = info["manifest"]["final"]
    assert final["iter"] == 4 and 0 < final["val_loss"] < 4.2  # ln 65 = 4.17: finite and below chance


def test_attention_budget_resolves_to_the_declared_budget_updated_by_the_options():
    assert attention_options("srf", None, "high", 4096, seed=3) == {**common.budget_options("srf", 4096, 3)[-1]}
    assert attention_options("knn", {"num_samples": 7}, "low", 1024, seed=0) == {
        **common.budget_options("knn", 1024, 0)[0], "num_samples": 7}
    assert attention_options("exact") == {}
    with pytest.raises(ValueError, match="'exact' has no budgets"):
        attention_options("exact", budget="mid", n=64)


def test_a_name_that_cannot_train_is_refused_clearly(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        RecallTrainConfig(attention="nope")
    with pytest.raises(ValueError, match="nope"):
        train_recall_script.main(["--attention", "nope", "--out", str(tmp_path / "x.pth")])
    with pytest.raises(ValueError, match="nope"):
        train_lm_script.main(["--quick", "--attention", "nope", "--work-dir", str(tmp_path / "w"),
                              "--out", str(tmp_path / "x.pth")])
    monkeypatch.setattr(common.method_class("uniform"), "trainable", False)
    with pytest.raises(ValueError, match="'uniform' cannot train a GPT: it is inference-only"):
        train_recall_script.main(["--attention", "uniform", "--out", str(tmp_path / "x.pth")])
    with pytest.raises(ValueError, match="'uniform' cannot train a GPT"):
        train_lm_script.main(["--quick", "--attention", "uniform", "--work-dir", str(tmp_path / "w"),
                              "--out", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x.pth").exists()


def test_fit_max_iters_times_probe_runs_and_removes_them(tmp_path):
    from long_context.training import fit_max_iters
    from nanoGPT.train import TrainConfig
    cfg = TrainConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, batch_size=2, max_iters=1000, eval_iters=1,
                      attention="srf", attention_options={"nb_features": 8}, out_dir=str(tmp_path / "run"),
                      progress=False)
    fitted = fit_max_iters(cfg, seconds=0.5)
    assert fitted["seconds_per_step"] > 0 and fitted["probe_seconds"] > 0
    assert fitted["max_iters"] == int(min(1000, max(25, 0.5 / fitted["seconds_per_step"])))
    assert list(tmp_path.iterdir()) == []  # the probes' scratch folder is gone; the run's own is not made


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(METHODS))
def test_cuda_bf16_training_steps_with_the_method(case):
    """The GPU script's training path: the method's forward and backward on CUDA tensors under bf16 autocast
    (knn through its device indexes), finite loss and gradients, the weights move."""
    name, options = METHODS[case]
    cfg = RecallTrainConfig(lengths=(256,), key_curriculum=(), batch_size=4, max_iters=3, eval_interval=3,
                            eval_batches=1, attention=name, attention_options=options, device="cuda",
                            dtype="bfloat16")
    model = GPT(cfg.model_config())
    before = [p.detach().clone() for p in model.parameters()]
    model, history = train_recall(cfg, model, progress=False)
    assert all(torch.isfinite(torch.tensor(row["loss_n256"])) for row in history)
    assert next(model.parameters()).device.type == "cuda" and model.layer_attention_names() == [name, name]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach().cpu()) for a, p in zip(before, model.parameters()))


def test_evaluate_runs_each_checkpoint_given(tmp_path, tiny_lm_path):
    other = tmp_path / "other.pth"
    other.write_bytes(tiny_lm_path.read_bytes())
    rows = evaluate_script.main(["--model", "lm", "--lm-checkpoint", str(tiny_lm_path), str(other), "--n", "32",
                                 "--methods", "exact", "--extra", "srf", '{"nb_features": 8}', "--batches", "1",
                                 "--batch-size", "1", "--threads", "1", "--out", str(tmp_path)])
    assert [(r["checkpoint"], r["method"], r["status"]) for r in rows] == [
        ("lm.pth", "exact", "ok"), ("lm.pth", "srf", "ok"), ("other.pth", "exact", "ok"), ("other.pth", "srf", "ok")]
    assert rows[0]["metric"] == rows[2]["metric"]  # the same weights, the same seeded windows


def test_committed_method_trained_checkpoints_run_their_method():
    """The GPU-trained checkpoints (long_context/gpu_train_methods.sh): they load running the method they were
    trained with, their manifest says so, and on the CPU they recall with it far above chance (1/8) at n = 1024
    (the srf-trained one reproduces its GPU training-time accuracy: srf is deterministic given its projection)."""
    from long_context.checkpoints import CHECKPOINT_DIR
    for name, method in (("recall_long_knn.pth", "knn"), ("recall_long_srf.pth", "srf"), ("lm_knn.pth", "knn"),
                         ("lm_srf.pth", "srf")):
        model, info = load_model(CHECKPOINT_DIR / name)
        assert model.layer_attention_names() == [method] * model.config.n_layer
        assert info["manifest"]["trained_attention"]["name"] == method
        assert trained_attention(model) == (method, info["manifest"]["trained_attention"]["options"])
        if info["kind"] == "recall":
            accuracy = recall_metric(model, info["task"].with_length(1024), 2, 8, seed=10_000)["accuracy"]
            assert accuracy > 0.5, (name, accuracy)
            if method == "srf":
                assert accuracy == info["manifest"]["final"]["accuracy_n1024"]
