"""The paper's forward-error experiment (Haris 2024, Sec. 6; the authors' ``forward_pass_test_batched.py``): mean
absolute error of kNN attention against exact attention as k grows, for inputs of several scales B.

Q, K, V have i.i.d. entries uniform in [-B, B] (b = 1, h heads, n tokens, d = 32); larger B makes the softmax rows
more peaked (scores S q . k with S = 1/sqrt(d) have standard deviation B^2 / 3). k runs over the authors' grid
{3, ln n, n^(1/8), n^(1/4), n^(1/2)} (integer parts, duplicates dropped). Each point is the mean (and standard
deviation) of the mean absolute error over ``--repeats`` draws of the inputs and of the estimator's samples.
Estimators: (b) ``topk_uniform_tail`` (top-k plus l = k uniform tail samples, our default) and (d) ``adaptive``
(the same k as its starting point).

    python -m knn_attention.experiment_forward_error --quick      # n = 256, 2 heads, 3 repeats
    python -m knn_attention.experiment_forward_error              # the authors' n = 1000, 10 heads, 10 repeats
"""
from __future__ import annotations

import csv
import math

import torch

from common import get_attention, plotting, softmax_attention
from common.cli import script_parser

FIELDS = ["B", "k", "k_label", "estimator", "mean_abs_error", "std"]
SCALES = (2.0, 2.5, 3.0, 3.5, 4.0)


def k_grid(n: int) -> list[tuple[int, str]]:
    """The authors' k values for n with their labels, increasing, duplicates dropped."""
    grid = {}
    for value, label in ((3, "3"), (int(math.log(n)), "ln n"), (int(n ** 0.125), "n^1/8"),
                         (int(n ** 0.25), "n^1/4"), (int(n ** 0.5), "n^1/2")):
        grid.setdefault(max(1, value), label)
    return sorted(grid.items())


def run(n: int, heads: int, d: int, repeats: int, estimators: list[str], seed: int, device="cpu") -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for scale in SCALES:
        for k, label in k_grid(n):
            for est in estimators:
                errors = []
                for r in range(repeats):
                    q, kk, v = ((torch.rand(1, heads, n, d, generator=gen) * 2 - 1) * scale for _ in range(3))
                    q, kk, v = q.to(device), kk.to(device), v.to(device)
                    out = get_attention("knn", k=k, num_samples=k, estimator=est, seed=seed + r)(q, kk, v)
                    errors.append((out - softmax_attention(q, kk, v)).abs().mean().item())
                t = torch.tensor(errors)
                rows.append(dict(B=scale, k=k, k_label=label, estimator=est, mean_abs_error=t.mean().item(),
                                 std=t.std().item() if repeats > 1 else 0.0))
    return rows


def plot(rows: list[dict], n: int, estimators: list[str], path):
    fig, axes = plotting.new_figure(ncols=len(estimators), width=4.5)
    colors = dict(zip(SCALES, ("tab:blue", "tab:green", "tab:red", "tab:cyan", "tab:purple")))
    for ax, est in zip(axes[0], estimators):
        for scale in SCALES:
            pts = [r for r in rows if r["B"] == scale and r["estimator"] == est]
            ks = [r["k"] for r in pts]
            mean = torch.tensor([r["mean_abs_error"] for r in pts])
            std = torch.tensor([r["std"] for r in pts])
            ax.plot(ks, mean, "o-", color=colors[scale], label=f"B = {scale}")
            ax.fill_between(ks, (mean - std).clamp_min(0), mean + std, color=colors[scale], alpha=0.2)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([r["k"] for r in pts], [f"{r['k_label']}\n({r['k']})" for r in pts], fontsize=7)
        ax.set_xlabel(f"k (n = {n})")
        ax.set_ylabel("mean absolute error vs exact")
        ax.set_title(f"estimator {est}", fontsize=9)
        ax.legend(fontsize=7)
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser("Mean error of kNN attention vs k for inputs uniform in [-B, B] (the paper's forward "
                           "error experiment).", quick_help="n = 256, 2 heads, 3 repeats")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--estimators", nargs="+", default=["topk_uniform_tail", "adaptive"],
                        choices=["topk", "topk_uniform_tail", "gumbel", "adaptive"])
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.heads, args.repeats = 256, 2, 3
    rows = run(args.n, args.heads, args.d, args.repeats, args.estimators, args.seed, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "knn_forward_error.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"B={r['B']:.1f} k={r['k']:>3} ({r['k_label']:>5}) {r['estimator']:>17}: "
              f"{r['mean_abs_error']:.4f} +- {r['std']:.4f}")
    png = plot(rows, args.n, args.estimators, args.out / "knn_forward_error.png")
    print(f"wrote {png} and {args.out / 'knn_forward_error.csv'}")
    return rows


if __name__ == "__main__":
    main()
