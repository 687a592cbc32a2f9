"""Validation loss and perplexity of a GPT, and the attention swap: a model trained with ``exact`` evaluated with
any registered method in its place (the evaluation of the tree-attention report, for every method).

Loss is the mean next-token cross-entropy (nats per character) over ``max_batches`` batches drawn at offsets
from a generator seeded with ``seed``; perplexity is exp(loss). Training uses this same function, so evaluating
a checkpoint with ``exact`` and the training run's batch_size / eval_iters reproduces its last validation loss.

    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact                       # exact, as trained
    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact --attention=knn --attention_options="{'k': 16}"
    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact --attention=all       # every causal method
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import plotting

from .configurator import load_config
from .data_loader import get_batch, load_split


@torch.no_grad()
def evaluate(model, split: str = "val", batch_size: int = 12, max_batches: int = 20, seed: int = 0,
             amp_dtype: torch.dtype | None = None) -> dict:
    """{'loss', 'perplexity'} of ``model`` on ``split``, averaged over ``max_batches`` seeded batches."""
    if max_batches < 1:
        raise ValueError(f"evaluate: max_batches must be >= 1, got {max_batches}")
    data = load_split(split)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(max_batches):
            x, y = get_batch(data, batch_size, model.config.block_size, generator, device)
            with autocast:
                total += model(x, y)[1].item()
    finally:
        model.train(was_training)
    loss = total / max_batches
    return {"loss": loss, "perplexity": math.exp(loss)}


@dataclass
class EvalConfig:
    """Evaluate a checkpoint, optionally with another attention method swapped in."""
    out_dir: str = "nanoGPT/out/quick_exact"
    attention: str = ""            # '' = as trained; a registered name; 'all' = every causal method at its budgets
    attention_options: dict = field(default_factory=dict)
    methods: list = field(default_factory=list)  # with --attention=all: only these methods (default: all)
    split: str = "val"
    batch_size: int = 0            # 0 = the training run's batch_size (so that exact reproduces its val loss)
    max_batches: int = 0           # 0 = the training run's eval_iters
    seed: int = 0
    device: str = "cpu"
    csv: str = ""                  # where to write the table with --attention=all ('' = assets/nanogpt_swap_eval.csv)


def swap_candidates(block_size: int, seed: int, methods=None) -> list[tuple[str, dict]]:
    """Every registered method (or each of ``methods``) that can attend causally, at each budget it declares
    for ``block_size`` keys."""
    runs = []
    for name in methods or common.available():
        cls = common.method_class(name)
        if not cls.supports_causal:
            continue
        for options in cls.budgets(block_size):
            runs.append((name, {**options, "seed": seed} if cls.randomized else dict(options)))
    return runs


def main(argv=None) -> list[dict]:
    from .checkpoint import load_model

    cfg = load_config(EvalConfig, sys.argv[1:] if argv is None else argv)
    model, meta = load_model(cfg.out_dir, device=cfg.device)
    trained = meta["config"]
    batch_size = cfg.batch_size or trained["batch_size"]
    max_batches = cfg.max_batches or trained["eval_iters"]
    if cfg.attention == "all":
        runs = swap_candidates(model.config.block_size, cfg.seed, cfg.methods)
    elif cfg.attention:
        runs = [(cfg.attention, cfg.attention_options)]
    else:
        runs = [(model.config.attention, model.config.attention_options)]
    rows = []
    for name, options in tqdm(runs, desc="evaluate", disable=len(runs) == 1):
        model.set_attention(name, **options)
        result = evaluate(model, cfg.split, batch_size, max_batches, cfg.seed)
        rows.append({"method": name, "options": json.dumps(options), **result})
        tqdm.write(f"{name} {options}: {cfg.split} loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}")
    if cfg.attention == "all":
        path = Path(cfg.csv) if cfg.csv else plotting.ASSETS / "nanogpt_swap_eval.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["method", "options", "loss", "perplexity"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path} ({cfg.out_dir}, trained with {trained['attention']} for {meta['iter_num']} iters; "
              f"{max_batches} batches of {batch_size} x {model.config.block_size} tokens, seed {cfg.seed})")
    return rows


if __name__ == "__main__":
    main()
