"""Plot a training run's loss curve (``<out_dir>/loss_curve.csv``, written by nanoGPT.train) to a PNG.

    python -m nanoGPT.plot_loss_curve nanoGPT/out/shakespeare_char/loss_curve.csv --out assets/nanogpt_gpu_loss.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import plotting


def read_curve(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curve(rows: list[dict], path: Path, title: str) -> Path:
    fig, axes = plotting.new_figure()
    ax = axes[0][0]
    steps = [(r["iter"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    if steps:
        ax.plot(*zip(*steps), color="#bbbbbb", lw=0.6, label="training batch loss (dropout on)")
    evals = [r for r in rows if r["eval_val_loss"] is not None]
    ax.plot([r["iter"] for r in evals], [r["eval_train_loss"] for r in evals], "o-", ms=3, color="#1f77b4",
            label="train split (eval mode)")
    ax.plot([r["iter"] for r in evals], [r["eval_val_loss"] for r in evals], "o-", ms=3, color="#d62728",
            label="validation split")
    best = min(evals, key=lambda r: r["eval_val_loss"])
    ax.axhline(best["eval_val_loss"], color="#d62728", ls=":", lw=0.8,
               label=f"best val {best['eval_val_loss']:.4f} at iter {best['iter']:.0f}")
    ax.set_xlabel("training step (iterations)")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(title)
    ax.legend()
    return plotting.save_figure(fig, path)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("curve", type=Path, help="a loss_curve.csv written by nanoGPT.train")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS / "nanogpt_loss_curve.png")
    parser.add_argument("--title", default=None, help="figure title (default: the CSV's folder)")
    args = parser.parse_args(argv)
    path = plot_curve(read_curve(args.curve), args.out, args.title or args.curve.parent.name)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
