"""The small GPTs trained with exact attention that the comparison and the demos take real q/k/v from.

    model, meta = get_quick_model()      # trains on first use (a few minutes on 2 cores), then loads
    model, meta = get_small_model()      # committed to the repository: loads in a second, trains nothing

The quick model is the CPU config (config/train_shakespeare_char_cpu.py: 4 layers, 4 heads, 128 dims, block 64)
trained for QUICK_ITERS iterations into nanoGPT/out/quick_exact/. A file lock makes concurrent first uses train it
once; an interrupted training run is resumed, not restarted.

The small model is the same config shrunk by SMALL_OVERRIDES (2 layers, 2 heads of dimension 32, 64 dims),
trained once by ``python -m nanoGPT.make_small_model`` and committed as ``pretrained/shakespeare_small.pth``
(float16 weights, a few hundred KB; ``.pth`` because ``*.pt`` is git-ignored) beside a JSON manifest that records
the command, the overrides, the validation loss and the file's SHA-256, checked on every load.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, load_model
from .configurator import PACKAGE_DIR, load_config
from .data_loader import load_meta
from .model import GPT, GPTConfig
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


SMALL_MODEL = PACKAGE_DIR / "pretrained" / "shakespeare_small.pth"
SMALL_MANIFEST = SMALL_MODEL.with_suffix(".json")
SMALL_OVERRIDES = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--max_iters=1000", "--lr_decay_iters=1000",
                   "--eval_interval=250"]
SMALL_COMMAND = "python -m nanoGPT.make_small_model"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_small_model(path: Path = SMALL_MODEL, progress: bool = True) -> dict:
    """Train the small model (CPU config with SMALL_OVERRIDES) in ``out/small_exact/`` (an interrupted build
    resumes there), write its float16 weights to ``path`` and the manifest beside it; return the manifest."""
    path = Path(path)
    out_dir = PACKAGE_DIR / "out" / "small_exact"
    cfg = load_config(TrainConfig, ["config/train_shakespeare_char_cpu.py", f"--out_dir={out_dir}",
                                    *SMALL_OVERRIDES, f"--progress={progress}"])
    if not _finished(cfg):
        cfg.init_from = "resume" if checkpoint_path(out_dir).exists() else "scratch"
        train(cfg)
    model, meta = load_model(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": model.config.to_dict(),
                "model": {name: t.half() for name, t in model.state_dict().items()}}, path)
    manifest = {"command": SMALL_COMMAND, "base_config": "config/train_shakespeare_char_cpu.py",
                "overrides": SMALL_OVERRIDES, "iter_num": meta["iter_num"], "best_val_loss": meta["best_val_loss"],
                "weights": "float16", "file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def get_small_model(device="cpu", path: Path = SMALL_MODEL):
    """(model, meta) of the committed small model in eval mode on ``device`` (float32 weights); ``meta`` holds the
    vocabulary and the manifest. A missing file or one whose SHA-256 differs from the manifest's is an error."""
    path = Path(path)
    manifest_path = path.with_suffix(".json")
    if not path.is_file() or not manifest_path.is_file():
        raise FileNotFoundError(f"get_small_model: no committed model at {path} (with {manifest_path.name}); "
                                f"make it with `{SMALL_COMMAND}`")
    manifest = json.loads(manifest_path.read_text())
    if _sha256(path) != manifest["sha256"]:
        raise CheckpointError(f"get_small_model: {path} does not match the SHA-256 in {manifest_path.name}; "
                              f"rebuild it with `{SMALL_COMMAND}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict({name: t.float() for name, t in state["model"].items()})
    return model.to(device).eval(), {**load_meta(), "manifest": manifest}
