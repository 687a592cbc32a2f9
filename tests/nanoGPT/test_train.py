"""Training: the loss falls, resume is exact, checkpoints are atomic and checked, configs are parsed strictly."""
from dataclasses import fields

import matplotlib.image
import pytest
import torch

from nanoGPT.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, load_model, save_checkpoint
from nanoGPT.configurator import load_config
from nanoGPT.model import GPTConfig, ModelConfig
from nanoGPT.train import TrainConfig, learning_rate, train

from .conftest import tiny_config


def test_loss_decreases_over_50_steps(tiny_run):
    result, _ = tiny_run
    evals = [r for r in result["history"] if "eval_val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 25, 50]
    # From ~ln(65) = 4.17 nats at initialisation; 50 steps learn at least the character frequencies.
    assert evals[-1]["eval_val_loss"] < evals[0]["eval_val_loss"] - 0.5
    assert evals[-1]["eval_train_loss"] < evals[0]["eval_train_loss"] - 0.5


def test_checkpoint_and_loss_curve_are_written(tiny_run):
    result, out_dir = tiny_run
    model, meta = load_model(out_dir)
    assert meta["iter_num"] == 50 and meta["config"]["max_iters"] == 50 and meta["vocab_size"] == 65
    lines = (out_dir / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "iter,lr,train_loss,eval_train_loss,eval_val_loss"
    assert len(lines) == 1 + 51  # the iteration-0 evaluation plus one row per step
    assert not list(out_dir.glob("*.tmp"))


def test_resume_equals_uninterrupted(tmp_path):
    """20 steps in one go == 10 steps, stop, resume to 20: identical losses, bit for bit (dropout on)."""
    common_args = ["--dropout=0.1", "--lr_decay_iters=20", "--eval_interval=5", "--eval_iters=2"]
    whole = train(tiny_config(tmp_path / "whole", "--max_iters=20", *common_args))
    train(tiny_config(tmp_path / "parts", "--max_iters=10", *common_args))
    resumed = train(tiny_config(tmp_path / "parts", "--max_iters=20", "--init_from=resume", *common_args))
    assert resumed["history"] == whole["history"]
    a, _ = load_model(tmp_path / "whole")
    b, _ = load_model(tmp_path / "parts")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_equals_uninterrupted_for_a_randomised_method(tmp_path):
    """The attention method's own random stream is saved and restored too."""
    common_args = ["--attention=uniform", "--attention_options={'num_samples': 4}", "--lr_decay_iters=8",
                   "--eval_interval=4", "--eval_iters=1"]
    whole = train(tiny_config(tmp_path / "whole", "--max_iters=8", *common_args))
    train(tiny_config(tmp_path / "parts", "--max_iters=4", *common_args))
    resumed = train(tiny_config(tmp_path / "parts", "--max_iters=8", "--init_from=resume", *common_args))
    assert resumed["history"] == whole["history"]


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    path = checkpoint_path(tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny_config(tmp_path, "--init_from=resume"))
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(tmp_path))  # scratch would overwrite it: refused without --overwrite
    assert path.read_bytes() == b"not a checkpoint"


def test_mismatched_checkpoint_is_refused_and_kept(tiny_run, tmp_path):
    _, out_dir = tiny_run
    before = checkpoint_path(out_dir).read_bytes()
    with pytest.raises(CheckpointError, match="n_embd"):
        train(tiny_config(out_dir, "--init_from=resume", "--n_embd=48", "--max_iters=60"))
    assert checkpoint_path(out_dir).read_bytes() == before


# The keys of a checkpoint's "config" and "model_config" as the code before ModelConfig wrote them (TrainConfig
# then repeated GPTConfig's fields): checkpoints made by it must still resume.
OLD_CONFIG_KEYS = ["out_dir", "init_from", "overwrite", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
                   "attention", "attention_options", "batch_size", "max_iters", "learning_rate", "weight_decay",
                   "beta1", "beta2", "grad_clip", "warmup_iters", "lr_decay_iters", "min_lr", "eval_interval",
                   "eval_iters", "eval_seed", "progress", "seed", "device", "dtype", "threads"]
OLD_MODEL_KEYS = ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attention",
                  "attention_options"]


def test_checkpoint_in_the_old_layout_resumes(tmp_path):
    common_args = ["--lr_decay_iters=8", "--eval_interval=4", "--eval_iters=1"]
    whole = train(tiny_config(tmp_path / "whole", "--max_iters=8", *common_args))
    train(tiny_config(tmp_path / "old", "--max_iters=4", *common_args))
    state = load_checkpoint(tmp_path / "old")
    assert set(OLD_CONFIG_KEYS) <= set(state["config"]) and set(OLD_MODEL_KEYS) <= set(state["model_config"])
    state["config"] = {k: state["config"][k] for k in OLD_CONFIG_KEYS}  # the old keys only, in the old order
    state["model_config"] = {k: state["model_config"][k] for k in OLD_MODEL_KEYS}
    save_checkpoint(tmp_path / "old", state)
    resumed = train(tiny_config(tmp_path / "old", "--max_iters=8", "--init_from=resume", *common_args))
    assert resumed["history"] == whole["history"]


def test_model_fields_have_one_home():
    """TrainConfig and GPTConfig take the model's fields and defaults from ModelConfig; the config files set
    bias=False, which TrainConfig's own default was before, so that they still mean the same model."""
    model_keys = [f.name for f in fields(ModelConfig)]
    assert [f.name for f in fields(TrainConfig)][:len(model_keys)] == model_keys
    assert [f.name for f in fields(GPTConfig)] == model_keys + ["vocab_size"]
    assert TrainConfig().model_fields() == ModelConfig().model_fields() == GPTConfig().model_fields()
    for path in ("config/train_tiny.py", "config/train_shakespeare_char_cpu.py", "config/train_shakespeare_char.py"):
        assert load_config(TrainConfig, [path]).bias is False
    with pytest.raises(ValueError, match="TrainConfig: n_embd=30 must be divisible by n_head=4"):
        TrainConfig(n_embd=30, n_head=4)  # ModelConfig's checks hold for a training config too


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path)


def test_config_files_and_overrides():
    cfg = load_config(TrainConfig, ["config/train_shakespeare_char_cpu.py", "--attention=uniform",
                                    "--attention_options={'num_samples': 8}", "--learning_rate=1"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.max_iters, cfg.bias) == \
        (4, 4, 128, 64, 2000, False)
    assert cfg.attention == "uniform" and cfg.attention_options == {"num_samples": 8}
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    gpu = load_config(TrainConfig, ["config/train_shakespeare_char.py"])
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.dropout, gpu.max_iters, gpu.bias) == \
        (6, 6, 384, 256, 0.2, 5000, False)


@pytest.mark.parametrize("arg, error, match", [("--n_layr=3", ValueError, "unknown config key 'n_layr'"),
                                               ("--n_layer=three", TypeError, "n_layer"),
                                               ("--n_layer", ValueError, "--key=value"),
                                               ("config/nope.py", FileNotFoundError, "nope.py")])
def test_bad_config_is_a_clear_error(arg, error, match):
    with pytest.raises(error, match=match):
        load_config(TrainConfig, [arg])


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert learning_rate(0, cfg) < learning_rate(9, cfg) < 1.0
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_non_finite_loss_writes_no_checkpoint(tmp_path):
    # Divergence is caught either by the attention's input check (non-finite q) or by the loss check.
    with pytest.raises((FloatingPointError, ValueError), match="non-finite|no checkpoint"):
        train(tiny_config(tmp_path, "--learning_rate=1e30", "--grad_clip=0.0", "--warmup_iters=0"))
    # Only the iteration-0 checkpoint (written before the first step) is on disk: nothing diverged was saved.
    saved = load_checkpoint(tmp_path)
    assert saved["iter_num"] == 0 and all(torch.isfinite(p).all() for p in saved["model"].values())


def test_loss_curve_plot(tiny_run, tmp_path):
    from nanoGPT.plot_loss_curve import main as plot_main, read_curve

    _, out_dir = tiny_run
    rows = read_curve(out_dir / "loss_curve.csv")
    assert rows[0]["iter"] == 0 and rows[0]["train_loss"] is None and rows[-1]["eval_val_loss"] is not None
    path = plot_main([str(out_dir / "loss_curve.csv"), "--out", str(tmp_path / "c.png")])
    pixels = matplotlib.image.imread(path)  # a readable PNG with something drawn on it
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0
    assert len(rows) == 51 and [r["iter"] for r in rows] == list(range(51))
