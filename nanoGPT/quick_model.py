"""The small GPT trained with exact attention that the comparison and the demos take real q/k/v from.

    model, meta = get_quick_model()      # trains on first use (a few minutes on 2 cores), then loads

It is the CPU config (config/train_shakespeare_char_cpu.py: 4 layers, 4 heads, 128 dims, block 64) trained for
QUICK_ITERS iterations into nanoGPT/out/quick_exact/. A file lock makes concurrent first uses train it once; an
interrupted training run is resumed, not restarted.
"""
from __future__ import annotations

import fcntl

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, load_model
from .configurator import PACKAGE_DIR, load_config
from .train import TrainConfig, train

QUICK_DIR = PACKAGE_DIR / "out" / "quick_exact"
QUICK_ITERS = 1000
QUICK_OVERRIDES: list[str] = []  # further --key=value overrides (the tests shrink the evaluation with it)


def quick_config(progress: bool = True) -> TrainConfig:
    return load_config(TrainConfig, ["config/train_shakespeare_char_cpu.py", f"--out_dir={QUICK_DIR}",
                                     f"--max_iters={QUICK_ITERS}", f"--lr_decay_iters={QUICK_ITERS}",
                                     f"--progress={progress}", *QUICK_OVERRIDES])


def _finished(cfg: TrainConfig) -> bool:
    try:
        return load_checkpoint(cfg.out_dir)["iter_num"] >= cfg.max_iters
    except CheckpointError:
        return False


def get_quick_model(device="cpu", progress: bool = True):
    """(model, meta) of the quick exact-attention model, in eval mode on ``device``; trains it if missing."""
    cfg = quick_config(progress)
    QUICK_DIR.mkdir(parents=True, exist_ok=True)
    with open(QUICK_DIR / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now: wait for it
        if not _finished(cfg):
            resume = checkpoint_path(QUICK_DIR).exists()
            if resume:
                load_checkpoint(QUICK_DIR)  # a corrupt file raises here, naming it, instead of being overwritten
            cfg.init_from = "resume" if resume else "scratch"
            train(cfg)
    return load_model(QUICK_DIR, device=device)
