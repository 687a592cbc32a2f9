"""Training the recall model (issue 14): a small task is learned from scratch (the loss counts only the queries),
the key curriculum draws only the keys of its stage, and a fine-tune keeps the task of its checkpoint."""
import torch

from long_context import train_recall as train_recall_script
from long_context.checkpoints import load_model
from long_context.recall import IGNORE_INDEX
from long_context.training import RecallTrainConfig, recall_loss, train_recall


def test_recall_loss_counts_only_the_queries():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 10.0
    targets = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    assert recall_loss(logits, targets).item() < 1e-3
    logits[0, 0] = torch.tensor([0.0, 0.0, 0.0, 50.0])  # a confident wrong prediction where nothing is scored
    assert recall_loss(logits, targets).item() < 1e-3


def test_a_small_recall_task_is_learned_from_scratch():
    cfg = RecallTrainConfig(lengths=(8,), pairs=1, queries=1, n_keys=4, n_values=4, n_distractors=4,
                            key_curriculum=(), batch_size=64, max_iters=80, eval_interval=40, eval_batches=2)
    model, history = train_recall(cfg, progress=False)
    assert history[0]["accuracy_n8"] < 0.5 < 0.95 < history[-1]["accuracy_n8"]
    assert [row["iter"] for row in history] == [0, 40, 80]


def test_curriculum_stages_use_their_keys(monkeypatch):
    seen = []
    import long_context.training as training
    real = training.recall_batch

    def spy(task, batch_size, generator, device="cpu", active_keys=None):
        seen.append((task.pairs, active_keys))
        return real(task, batch_size, generator, device, active_keys)

    monkeypatch.setattr(training, "recall_batch", spy)
    cfg = RecallTrainConfig(lengths=(32,), key_curriculum=(4, 12), curriculum_iters=2, max_iters=6, batch_size=2,
                            eval_interval=100, eval_batches=1)
    train_recall(cfg, progress=False)
    # evaluations (pairs 8, all keys) at iter 0 and at the end; steps: 2 with 4 keys, 2 with 12, then the full task
    assert seen == [(8, None), (4, 4), (4, 4), (8, 12), (8, 12), (8, None), (8, None), (8, None)]


def test_fine_tune_keeps_the_checkpoints_task_and_records_its_parent(tmp_path):
    out = tmp_path / "ft.pth"
    train_recall_script.main(["--init", "long_context/checkpoints/recall_exact.pth", "--lengths", "48",
                              "--max-iters", "2", "--batch-size", "2", "--eval-batches", "1", "--out", str(out)])
    model, info = load_model(out, "recall")
    _, parent = load_model("long_context/checkpoints/recall_exact.pth", "recall")
    assert info["task"] == parent["task"].with_length(48)
    assert info["manifest"]["fine_tuned_from"] == parent["manifest"]
    assert tuple(info["manifest"]["train_config"]["key_curriculum"]) == ()
    assert model.config.block_size == 48


def test_train_lm_quick_writes_a_checkpoint_with_its_manifest_and_exports_a_stopped_run(tmp_path):
    from long_context import train_lm as train_lm_script
    out, work = tmp_path / "lm.pth", tmp_path / "work"
    train_lm_script.main(["--quick", "--work-dir", str(work), "--out", str(out), "--threads", "1"])
    model, info = load_model(out, "lm")
    assert model.config.position_embedding == "learned" and model.config.block_size == 128
    assert info["meta"]["vocab_size"] == model.config.vocab_size == 65
    final = info["manifest"]["final"]
    assert final["iter"] == 4 and final["losses_at_iter"] == 4 and final["val_loss"] < 4.2  # ln 65 = 4.17
    assert info["manifest"]["train_config"]["block_size"] == 128
    # --export-only writes the model of the work dir's nanoGPT checkpoint again, training nothing
    out.unlink()
    train_lm_script.main(["--quick", "--work-dir", str(work), "--out", str(out), "--export-only"])
    again, again_info = load_model(out, "lm")
    assert again_info["manifest"]["final"] == final
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
