"""Long-context checkpoints (issue 14): the committed exact recall model solves its task; save/load round trip;
a missing file, a file of another kind or format, and weights of another architecture are clear errors."""
import json

import pytest
import torch

from long_context.checkpoints import CHECKPOINT_DIR, LM_CHECKPOINT, RECALL_CHECKPOINT, load_model, save_model
from long_context.evaluation import make_batches, measure
from long_context.training import recall_metric
from nanoGPT.checkpoint import CheckpointError
from nanoGPT.model import GPT, GPTConfig

ACCURACY_BAR = 0.9  # the committed model reaches ~0.97 at n <= 256 (its manifest's final row)


@pytest.mark.parametrize("n", [64, 256])
def test_committed_recall_model_solves_the_task(recall_model, n):
    model, info = recall_model
    assert model.config.position_embedding == "none" and info["kind"] == "recall"
    metric = recall_metric(model, info["task"].with_length(n), batches=2, batch_size=16, seed=123)
    assert metric["accuracy"] > ACCURACY_BAR, metric


def test_committed_manifest_names_command_commit_and_result():
    manifest = json.loads(RECALL_CHECKPOINT.with_suffix(".pth.json").read_text())
    assert manifest["command"].startswith("python -m long_context.train_recall")
    assert manifest["kind"] == "recall" and manifest["git_commit"] and manifest["machine"]
    final = {k: v for k, v in manifest["final"].items() if k.startswith("accuracy_n")}
    assert final and min(final.values()) > ACCURACY_BAR
    assert RECALL_CHECKPOINT.stat().st_size < 5e6  # small enough to commit


def test_committed_gpu_checkpoints_keep_their_metric():
    """recall_long.pth (the recall model fine-tuned at n up to 16384 on the GPU) still solves the task; the LM
    (block 4096, validation loss 1.71 nats at its last evaluation, perplexity 5.55) predicts the validation text
    far better than the unigram statistics (perplexity ~ 25)."""
    recall, info = load_model(CHECKPOINT_DIR / "recall_long.pth", "recall")
    assert info["manifest"]["fine_tuned_from"]["command"].startswith("python -m long_context.train_recall")
    assert recall_metric(recall, info["task"].with_length(512), 2, 8, seed=9)["accuracy"] > ACCURACY_BAR
    lm, lm_info = load_model(LM_CHECKPOINT, "lm")
    assert lm.config.block_size == 4096 and lm.config.position_embedding == "learned"
    assert lm_info["manifest"]["final"]["val_loss"] < 1.8 and LM_CHECKPOINT.stat().st_size < 5e6
    perplexity = measure(lm, "lm", make_batches("lm", 512, 1, 2, seed=0))["metric"]
    assert perplexity < 7.0, perplexity


def tiny_recall_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=16, n_layer=2, n_head=2, n_embd=16, vocab_size=20,
                                   position_embedding="none"), **overrides}))


def test_round_trip_keeps_weights_to_half_precision(tmp_path, recall_model):
    _, info = recall_model
    model = tiny_recall_model(vocab_size=info["task"].vocab_size)
    path = save_model(tmp_path / "m.pth", model, "recall", task=info["task"], manifest={"command": "test"})
    loaded, loaded_info = load_model(path, "recall")
    assert loaded_info["task"] == info["task"] and loaded_info["manifest"] == {"command": "test"}
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)
    assert json.loads((tmp_path / "m.pth.json").read_text())["command"] == "test"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no long-context checkpoint at .*nope.pth"):
        load_model(tmp_path / "nope.pth")


def test_other_kind_format_or_architecture_is_a_clear_error(tmp_path, recall_model, tiny_lm_path):
    with pytest.raises(CheckpointError, match="holds a 'lm' model, not the 'recall'"):
        load_model(tiny_lm_path, "recall")
    # a nanoGPT training checkpoint (another format)
    torch.save({"model": {}, "model_config": {}}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="not a long-context checkpoint"):
        load_model(tmp_path / "ckpt.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_model(tmp_path / "junk.pth")
    # weights of one architecture under the config of another (a wider model)
    state = torch.load(RECALL_CHECKPOINT, weights_only=False)
    state["model_config"]["n_embd"] = 2 * state["model_config"]["n_embd"]
    torch.save(state, tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match="(?s)do not fit the saved architecture.*size mismatch"):
        load_model(tmp_path / "wider.pth", "recall")
    state["model_config"] = {**state["model_config"], "n_embd": 64, "rotary": True}
    torch.save(state, tmp_path / "unknown_key.pth")
    with pytest.raises(CheckpointError, match="rotary"):
        load_model(tmp_path / "unknown_key.pth")
