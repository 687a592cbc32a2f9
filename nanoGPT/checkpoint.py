"""Checkpoints of a training run: ``<out_dir>/ckpt.pt`` plus the loss curve ``<out_dir>/loss_curve.csv``.

A checkpoint holds everything a run needs to continue as if it had never stopped: the model weights and their
``GPTConfig``, the optimiser state, the random states (torch's global stream, which drives dropout; CUDA's; the
batch sampler's generator; each randomised attention method's generator), the iteration, the best validation
loss, the loss history, the training config and the character vocabulary.

It is written atomically (:mod:`nanoGPT.atomic`: a temporary file in the same folder, flushed, then renamed
over the old one), so a crash mid-write leaves the previous checkpoint intact. Loading
a missing, corrupt or incomplete file raises :class:`CheckpointError` saying which file and what is wrong.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from .atomic import write_atomically
from .model import GPT, GPTConfig

CKPT_NAME = "ckpt.pt"
CURVE_NAME = "loss_curve.csv"
CURVE_FIELDS = ("iter", "lr", "train_loss", "eval_train_loss", "eval_val_loss")
REQUIRED_KEYS = ("model", "model_config", "optimizer", "rng", "iter_num", "best_val_loss", "history", "config",
                 "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, incomplete, or for a different model."""


def checkpoint_path(out_dir) -> Path:
    return Path(out_dir) / CKPT_NAME


def save_checkpoint(out_dir, state: dict) -> Path:
    """Write ``state`` (the keys of REQUIRED_KEYS) to ``<out_dir>/ckpt.pt`` atomically, and the loss curve."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {missing}")
    path = checkpoint_path(out_dir)
    write_atomically(path, lambda f: torch.save(state, f))
    write_loss_curve(Path(out_dir) / CURVE_NAME, state["history"])
    return path


def write_loss_curve(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in CURVE_FIELDS})
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def load_checkpoint(out_dir, device="cpu") -> dict:
    """The saved state of ``<out_dir>/ckpt.pt``; CheckpointError if it is missing, corrupt or incomplete."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (train one with `python -m nanoGPT.train ...`)")
    try:
        # weights_only=False: the checkpoint holds plain Python containers (config dicts, RNG byte tensors)
        # written by save_checkpoint; only load checkpoints you made.
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                              "delete it or point --out_dir elsewhere") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training state dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


def model_from_state(state: dict, path="checkpoint") -> GPT:
    """The GPT of a loaded checkpoint state, weights restored strictly."""
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the saved weights do not fit the saved model config ({err})") from err
    return model


def load_model(out_dir, attention: str | None = None, attention_options: dict | None = None,
               device="cpu") -> tuple[GPT, dict]:
    """The trained GPT of ``out_dir`` in eval mode (optionally with its attention swapped) and its meta:
    ``{'stoi', 'itos', 'vocab_size', 'config', 'iter_num', 'best_val_loss', 'history'}``."""
    state = load_checkpoint(out_dir, device)
    model = model_from_state(state, checkpoint_path(out_dir))
    if attention is not None:
        model.set_attention(attention, **(attention_options or {}))
    elif attention_options:
        raise ValueError("load_model: attention_options given without attention")
    model.to(device).eval()
    meta = {**state["meta"], "config": state["config"], "iter_num": state["iter_num"],
            "best_val_loss": state["best_val_loss"], "history": state["history"]}
    return model, meta
