"""The efficiency experiment (Haris 2024, Sec. 6): fast kNN attention vs exact attention as n grows.

For each n (keys = queries = n, one head, d = 64) and each input (Gaussian, clustered keys) it times exact
attention (``torch.nn.functional.scaled_dot_product_attention``) and the ``knn`` forward (top-k + uniformly
sampled tail, k = l = ceil(sqrt(n)), index build and search included and also reported alone), and measures the
relative Frobenius error of the kNN output. Medians of ``--repeats`` runs, ratio to exact in the same run.

    python -m knn_attention.efficiency --quick            # n = 2^10 .. 2^12, seconds
    python -m knn_attention.efficiency                    # n = 2^10 .. 2^16 (minutes on a 2-core CPU)
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from tqdm import tqdm

from common import get_attention, plotting
from common.bench import time_callable
from common.data import synthetic_qkv
from common.metrics import relative_frobenius_error

FIELDS = ["input", "n", "index", "exact_s", "knn_s", "speedup", "index_build_s", "index_search_s", "rel_fro"]


def measure(kind: str, n: int, index: str, d: int, repeats: int, seed: int, device) -> dict:
    x = synthetic_qkv(kind, 1, 1, n, n, d, seed=seed, device=device)
    exact = get_attention("exact")
    knn = get_attention("knn", index=index, seed=seed)
    with torch.no_grad():
        reference = exact(x.q, x.k, x.v)
        t_exact = time_callable(lambda: exact(x.q, x.k, x.v), warmup=0, repeats=repeats, device=device).median_s
        t_knn = time_callable(lambda: knn(x.q, x.k, x.v), warmup=0, repeats=repeats, device=device).median_s
        out = knn(x.q, x.k, x.v)
    return dict(input=kind, n=n, index=index, exact_s=t_exact, knn_s=t_knn, speedup=t_exact / t_knn,
                index_build_s=knn.last_times.build_s, index_search_s=knn.last_times.search_s,
                rel_fro=relative_frobenius_error(out, reference))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Time and error of kNN attention vs exact as n grows.")
    parser.add_argument("--log2n", type=int, nargs=2, default=[10, 16], metavar=("LO", "HI"))
    parser.add_argument("--indexes", nargs="+", default=["ivf", "flat"], choices=["flat", "ivf", "hnsw", "torch"])
    parser.add_argument("--inputs", nargs="+", default=["gaussian", "clustered"])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="n = 2^10 .. 2^12, one run each")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS)
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.repeats = [10, 12], 1
    grid = [(kind, 2 ** p, index) for kind in args.inputs for p in range(args.log2n[0], args.log2n[1] + 1)
            for index in args.indexes]
    rows = [measure(kind, n, index, args.d, args.repeats, args.seed, args.device)
            for kind, n, index in tqdm(grid, desc="efficiency")]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "knn_efficiency.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print("| input | n | index | exact (s) | knn (s) | exact / knn | build (s) | search (s) | rel. Frobenius err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['n']} | {r['index']} | {r['exact_s']:.4f} | {r['knn_s']:.4f} | {r['speedup']:.2f} "
              f"| {r['index_build_s']:.4f} | {r['index_search_s']:.4f} | {100 * r['rel_fro']:.1f}% |")
    fig, axes = plotting.new_figure(ncols=2)
    time_ax, err_ax = axes[0]
    styles = {"gaussian": "-", "clustered": "--"}
    for kind in args.inputs:
        sel = [r for r in rows if r["input"] == kind]
        ns = sorted({r["n"] for r in sel})
        exact_t = [next(r["exact_s"] for r in sel if r["n"] == n) for n in ns]
        time_ax.plot(ns, exact_t, "o" + styles.get(kind, "-"), color="black", label=f"exact ({kind})")
        for index in args.indexes:
            pts = [r for r in sel if r["index"] == index]
            color = plotting.method_color("knn") if index == "ivf" else plotting.method_color("uniform")
            time_ax.plot([r["n"] for r in pts], [r["knn_s"] for r in pts], "s" + styles.get(kind, "-"), color=color,
                         label=f"knn {index} total ({kind})")
            time_ax.plot([r["n"] for r in pts], [r["index_build_s"] + r["index_search_s"] for r in pts],
                         "x" + styles.get(kind, "-"), color=color, alpha=0.5, label=f"knn {index} index only ({kind})")
            err_ax.plot([r["n"] for r in pts], [r["rel_fro"] for r in pts], "s" + styles.get(kind, "-"), color=color,
                        label=f"knn {index} ({kind})")
    for ax in (time_ax, err_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n (tokens)")
        ax.legend(fontsize=6)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("median time per forward (s)")
    err_ax.set_ylabel("relative Frobenius error of output")
    time_ax.set_title(f"kNN vs exact attention, d = {args.d}, CPU")
    err_ax.set_title("kNN error (k = l = ceil(sqrt(n)))")
    print(f"wrote {plotting.save_figure(fig, args.out / 'knn_efficiency.png')} and {args.out / 'knn_efficiency.csv'}")
    return rows


if __name__ == "__main__":
    main()
