"""Validation loss and perplexity of a GPT, and the attention swap: a model trained with ``exact`` evaluated with
any registered method in its place (the evaluation of the tree-attention report, for every method).

Loss is the mean next-token cross-entropy (nats per character) over ``max_batches`` batches drawn at offsets
from a generator seeded with ``seed``; perplexity is exp(loss). Training uses this same function, so evaluating
a checkpoint with ``exact`` and the training run's batch_size / eval_iters reproduces its last validation loss.

    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact                       # exact, as trained
    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact --attention=knn --attention_options="{'k': 16}"
    python -m nanoGPT.evaluate --out_dir=nanoGPT/out/quick_exact --attention=all       # every causal method
    python -m nanoGPT.evaluate --quick --attention=tree    # the model of `python -m nanoGPT.train --quick`

A randomised method swapped in without a ``seed`` option gets ``--seed`` (``common.method_options``), so that a
run repeats exactly.
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

from .checkpoint import CheckpointError, load_model
from .configurator import TINY_CONFIG, ConfigError, load_config, read_config_file
from .data_loader import get_batch, load_split
from .model import check_attention


@torch.no_grad()
def evaluate(model, split: str = "val", batch_size: int = 12, max_batches: int = 20, seed: int = 0,
             amp_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """{'loss', 'perplexity'} of ``model`` on ``split``, averaged over ``max_batches`` seeded batches
    (``progress``: a progress bar over the batches)."""
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
        for _ in tqdm(range(max_batches), desc=f"{split} {model.config.attention}", unit="batch",
                      disable=not progress, leave=False, dynamic_ncols=True):
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
    seed: int = 0                  # seeds the batches, and the swapped method if it is randomised and has no seed
    device: str = "cpu"
    csv: str = ""                  # where to write the table with --attention=all ('' = assets/nanogpt_swap_eval.csv)
    progress: bool = True          # a progress bar over the batches


# What --quick stands for: the model of `python -m nanoGPT.train --quick`, two batches.
QUICK = [f"--out_dir={read_config_file(TINY_CONFIG)['out_dir']}", "--max_batches=2"]


def swap_candidates(block_size: int, seed: int, methods=None) -> list[tuple[str, dict]]:
    """Every method that can attend causally (or each of ``methods``, refused with the reason if it cannot), at
    each budget it declares for ``block_size`` keys, randomised ones seeded with ``seed``."""
    names = methods or common.methods(causal=True)
    for name in names:
        check_attention(name)
    return [(name, options) for name in names for options in common.budget_options(name, block_size, seed)]


def evaluate_swaps(cfg: EvalConfig) -> list[dict]:
    """One row {'method', 'options', 'loss', 'perplexity'} per method (and budget) that ``cfg`` asks for."""
    model, meta = load_model(cfg.out_dir, device=cfg.device)
    trained = meta["config"]
    batch_size = cfg.batch_size or trained["batch_size"]
    max_batches = cfg.max_batches or trained["eval_iters"]
    if cfg.attention == "all":
        runs = swap_candidates(model.config.block_size, cfg.seed, cfg.methods)
    elif cfg.attention:
        runs = [(cfg.attention, common.method_options(cfg.attention, cfg.attention_options, cfg.seed))]
    else:
        runs = [(model.config.attention, model.config.attention_options)]
    rows = []
    for name, options in tqdm(runs, desc="evaluate", disable=len(runs) == 1 or not cfg.progress):
        model.set_attention(name, **options)
        result = evaluate(model, cfg.split, batch_size, max_batches, cfg.seed, progress=cfg.progress)
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


def main(argv=None) -> list[dict]:
    try:
        cfg = load_config(EvalConfig, sys.argv[1:] if argv is None else argv, quick=QUICK)
        return evaluate_swaps(cfg)
    except (CheckpointError, FileNotFoundError, ConfigError) as err:
        raise SystemExit(f"nanoGPT.evaluate: {err}") from None


if __name__ == "__main__":
    main()
