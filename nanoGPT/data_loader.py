"""Token splits and random training batches for the GPT.

A batch is ``batch_size`` windows of ``block_size + 1`` consecutive tokens at random offsets: the first
``block_size`` tokens are the input x, the same window shifted by one the targets y (next-token prediction).
Offsets come from an explicit ``torch.Generator`` so that a run (and a resumed run) repeats exactly.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .data.shakespeare_char import prepare as shakespeare_prepare

DATA_DIR = shakespeare_prepare.HERE
SPLITS = ("train", "val")


def _ensure_prepared(data_dir: Path) -> None:
    if not all((data_dir / f).is_file() for f in ("train.bin", "val.bin", "meta.pkl")):
        shakespeare_prepare.prepare(out_dir=data_dir)


def load_split(split: str, data_dir: Path = DATA_DIR) -> np.ndarray:
    """The token ids (uint16) of ``split`` ('train' or 'val'); builds the token files on first use."""
    if split not in SPLITS:
        raise ValueError(f"load_split: split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    _ensure_prepared(data_dir)
    return np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)


def load_meta(data_dir: Path = DATA_DIR) -> dict:
    """The vocabulary saved with the data: {'vocab_size', 'stoi', 'itos'}."""
    data_dir = Path(data_dir)
    _ensure_prepared(data_dir)
    with open(data_dir / "meta.pkl", "rb") as f:
        return pickle.load(f)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (batch_size, block_size), torch.long, y the next tokens of x."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"get_batch: batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(f"get_batch: data has {len(data)} tokens, need at least block_size + 1 = {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    window = torch.from_numpy(np.stack([data[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64))
    x, y = window[:, :-1], window[:, 1:]
    return x.to(device), y.to(device)
