"""Train the same GPT with every attention method from scratch and compare validation perplexity over steps
(the training figure of the kNN-attention paper, Haris 2025, extended to every registered method).

Every run shares the config, the seed (so the same initial weights and the same batches) and the number of
steps; only ``attention`` differs. Each method runs at the middle budget it declares for the block length
(``budgets(block_size)[len // 2]``, or ``--budget`` to pick another; at short blocks the largest budgets cover
every key, which makes some methods exact), randomised ones seeded with ``--seed``.

    python -m nanoGPT.compare_training --quick          # tiny config, 10 steps: seconds per method on a CPU
    python -m nanoGPT.compare_training                  # the CPU config (config/train_shakespeare_char_cpu.py)
    python -m nanoGPT.compare_training --methods exact srf --max_iters 500 --device cuda
    python -m nanoGPT.compare_training --from_csv a.csv b.csv     # merge runs made apart, re-plot
    python -m nanoGPT.compare_training --from_runs DIR            # re-plot DIR/<method>/loss_curve.csv

Writes ``perplexity_training.csv`` / ``.png`` (``perplexity_training_quick.*`` with --quick) under --out and
prints the final validation loss of each method and its gap to exact.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

import common
from common import plotting

from .configurator import PACKAGE_DIR, TINY_CONFIG, load_config
from .train import TrainConfig, TrainingInterrupted, train

# --quick: the tiny config (config/train_tiny.py) for 10 steps, evaluated at 0, 5 and 10 on 2 batches.
QUICK_OVERRIDES = ["--max_iters=10", "--lr_decay_iters=10", "--eval_interval=5", "--eval_iters=2"]
CSV_FIELDS = ["method", "options", "iter", "val_loss", "val_perplexity", "train_loss", "wall_s"]


def run_options(name: str, block_size: int, budget: int | None, seed: int) -> dict:
    """Options of ``name`` at its budget number ``budget`` for ``block_size`` keys (None: the middle one;
    an index past the end takes the last), seeded with ``seed`` if the method is randomised."""
    budgets = common.budget_options(name, block_size, seed)
    return budgets[len(budgets) // 2 if budget is None else min(budget, len(budgets) - 1)]


def run(config_files: list[str], methods: list[str], overrides: list[str], runs_dir: Path, budget: int | None,
        seed: int,
        progress: bool = True) -> list[dict]:
    """Train each method; one row per (method, evaluation step)."""
    rows = []
    for name in tqdm(methods, desc="methods", disable=not progress):
        base = load_config(TrainConfig, config_files + overrides)
        options = run_options(name, base.block_size, budget, seed)
        cfg = load_config(TrainConfig, config_files + overrides + [
            f"--attention={name}", f"--attention_options={options!r}", f"--out_dir={runs_dir / name}",
            "--overwrite=True", f"--seed={seed}", f"--progress={progress}"])
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        for r in result["history"]:
            if "eval_val_loss" in r:
                rows.append({"method": name, "options": json.dumps(options), "iter": r["iter"],
                             "val_loss": r["eval_val_loss"], "val_perplexity": math.exp(r["eval_val_loss"]),
                             "train_loss": r["eval_train_loss"], "wall_s": wall})
    return rows


def read_runs(runs_dir: Path, config_files: list[str], overrides: list[str], budget: int | None,
              seed: int) -> list[dict]:
    """Rows from the loss curves ``runs_dir/<method>/loss_curve.csv`` of earlier runs (wall time unknown: nan);
    the options are recomputed by the same rule as :func:`run`."""
    cfg = load_config(TrainConfig, config_files + overrides)
    rows = []
    for curve in sorted(Path(runs_dir).glob("*/loss_curve.csv")):
        name = curve.parent.name
        options = run_options(name, cfg.block_size, budget, seed)
        with curve.open() as f:
            for r in csv.DictReader(f):
                if r["eval_val_loss"]:
                    val = float(r["eval_val_loss"])
                    rows.append({"method": name, "options": json.dumps(options), "iter": int(r["iter"]),
                                 "val_loss": val, "val_perplexity": math.exp(val),
                                 "train_loss": float(r["eval_train_loss"]), "wall_s": math.nan})
    if not rows:
        raise FileNotFoundError(f"compare_training: no <method>/loss_curve.csv under {runs_dir}")
    return sorted(rows, key=lambda r: ((r["method"] != "exact", r["method"]), r["iter"]))


def read_csv(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with Path(path).open() as f:
            for r in csv.DictReader(f):
                rows.append({**r, "iter": int(r["iter"]), **{k: float(r[k]) for k in CSV_FIELDS[3:]}})
    return sorted(rows, key=lambda r: ((r["method"] != "exact", r["method"]), r["iter"]))


def plot(rows: list[dict], path: Path, title: str) -> Path:
    fig, axes = plotting.new_figure()
    ax = axes[0][0]
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["iter"], r["val_perplexity"]) for r in rows if r["method"] == name]
        ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", ms=3, color=plotting.method_color(name), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step (iterations)")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_title(title)
    ax.legend()
    return plotting.save_figure(fig, path)


def summary(rows: list[dict]) -> str:
    final = {}
    for r in rows:
        final[r["method"]] = r  # the last evaluation of each method
    exact = final.get("exact")
    lines = ["| method | options | steps | val loss (nats) | - exact | val perplexity | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in final.items():
        gap = f"{r['val_loss'] - exact['val_loss']:+.4f}" if exact else "-"
        lines.append(f"| {name} | {r['options']} | {r['iter']} | {r['val_loss']:.4f} | {gap} "
                     f"| {r['val_perplexity']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Train the GPT with each attention method; plot val perplexity.")
    parser.add_argument("--config", default="config/train_shakespeare_char_cpu.py", help="training config file")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every trainable causal method")
    parser.add_argument("--max_iters", type=int, default=None, help="override the config's steps (and lr decay)")
    parser.add_argument("--eval_interval", type=int, default=None)
    parser.add_argument("--eval_iters", type=int, default=None, help="batches per evaluation")
    parser.add_argument("--budget", type=int, default=None,
                        help="index into each method's budgets (default: the middle one)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default=None, help="override the config's device")
    parser.add_argument("--quick", action="store_true",
                        help=f"the tiny config, {' '.join(QUICK_OVERRIDES)} (explicit flags still win)")
    parser.add_argument("--from_csv", type=Path, nargs="+", default=None,
                        help="train nothing: merge these CSVs (written by earlier runs) and plot them")
    parser.add_argument("--from_runs", type=Path, default=None,
                        help="train nothing: read DIR/<method>/loss_curve.csv (same config/seed/budget flags)")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS, help="folder for the CSV and the figure")
    parser.add_argument("--runs_dir", type=Path, default=PACKAGE_DIR / "out" / "compare_training",
                        help="folder for the per-method checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = TINY_CONFIG if args.quick else args.config
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.max_iters is not None:
        overrides += [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    for key in ("eval_interval", "eval_iters"):
        if getattr(args, key) is not None:
            overrides.append(f"--{key}={getattr(args, key)}")
    if args.device is not None:
        overrides.append(f"--device={args.device}")
    if args.from_csv:
        rows = read_csv(args.from_csv)
    elif args.from_runs:
        rows = read_runs(args.from_runs, [config], overrides, args.budget, args.seed)
    else:
        methods = args.methods or common.methods(causal=True, trainable=True)
        try:
            rows = run([config], methods, overrides, args.runs_dir, args.budget, args.seed, not args.no_progress)
        except TrainingInterrupted as stopped:
            print(f"nanoGPT.compare_training: stopped; the methods trained so far are under {args.runs_dir}",
                  file=sys.stderr)
            raise SystemExit(128 + stopped.signum) from None
    stem = "perplexity_training_quick" if args.quick else "perplexity_training"
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    cfg = load_config(TrainConfig, [config] + overrides)
    title = (f"{Path(config).stem}: {cfg.n_layer} layers, {cfg.n_embd} dims, block {cfg.block_size}, "
             f"seed {args.seed}")
    figure = plot(rows, args.out / f"{stem}.png", title)
    print(summary(rows))
    print(f"wrote {args.out / f'{stem}.csv'}, {figure}")
    return rows


if __name__ == "__main__":
    main()
