"""The comparison: every registered method against ``exact`` on the same inputs (what ``make demo`` runs).

For each input kind, each sequence length n, causal and non-causal, and each method at the budgets it
declares (``AttentionMethod.budgets(n)``), it measures output errors (relative Frobenius, relative spectral),
time (median, and ratio to exact in the same run) and peak memory, prints a markdown table, and writes
``compare.csv`` and ``compare_pareto.png`` (error vs time, one curve per method, one panel per input).

    python -m common.compare --quick            # seconds
    python -m common.compare --n 1024 4096      # the default grid
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import plotting
from .bench import evaluate_methods
from .data import SYNTHETIC_KINDS, synthetic_qkv
from .registry import available, method_class

CSV_FIELDS = ["input", "n", "causal", "method", "options", "time_s", "ratio_to_exact", "rel_fro", "rel_spec",
              "max_abs", "kl", "peak_mem_bytes"]


def comparison_grid(inputs, ns, causal_modes, methods=None) -> list[tuple]:
    """All (input, n, causal, method, options) to run; methods that refuse causal are skipped for causal."""
    methods = [m for m in (methods or available()) if m != "exact"]
    grid = []
    for kind in inputs:
        for n in ns:
            for causal in causal_modes:
                for name in methods:
                    cls = method_class(name)
                    if causal and not cls.supports_causal:
                        continue
                    for options in cls.budgets(n):
                        grid.append((kind, n, causal, name, options))
    return grid


def run_comparison(inputs=("gaussian", "clustered"), ns=(1024,), causal_modes=(False, True), methods=None,
                   batch=1, heads=4, head_dim=64, seed=0, repeats=3, dtype=torch.float32, device="cpu",
                   progress=True) -> list[dict]:
    """Run the grid; return one row per (input, n, causal, method, budget), exact included as reference."""
    rows = []
    grid = comparison_grid(inputs, ns, causal_modes, methods)
    bar = tqdm(total=len(grid), desc="compare", disable=not progress)
    for kind in inputs:
        for n in ns:
            x = synthetic_qkv(kind, batch, heads, n, n, head_dim, seed=seed, dtype=dtype, device=device)
            for causal in causal_modes:
                cell = [(name, opts) for (g_kind, g_n, g_causal, name, opts) in grid
                        if (g_kind, g_n, g_causal) == (kind, n, causal)]
                for name, opts in cell:
                    if method_class(name).randomized:
                        opts = {**opts, "seed": seed}
                    for row in evaluate_methods([(name, opts)], x.q, x.k, x.v, causal=causal, repeats=repeats):
                        if row["method"] == "exact" and any(r["method"] == "exact" and r["input"] == kind
                                                            and r["n"] == n and r["causal"] == causal
                                                            for r in rows):
                            continue
                        rows.append({"input": kind, "n": n, "causal": causal, **row})
                    bar.update(1)
    bar.close()
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (times in ms, errors in %)."""
    lines = ["| input | n | causal | method | options | time (ms) | x exact | rel. Frobenius err | rel. spectral err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "seed") or "-"
        lines.append(f"| {r['input']} | {r['n']} | {r['causal']} | {r['method']} | {opts} | {1e3 * r['time_s']:.2f} "
                     f"| {r['ratio_to_exact']:.2f} | {100 * r['rel_fro']:.2f}% | {100 * r['rel_spec']:.2f}% |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r[k] for k in CSV_FIELDS}, "options": json.dumps(r["options"])})


def plot_pareto(rows: list[dict], path: Path) -> Path:
    """Relative Frobenius error vs time ratio to exact, one curve per method, one panel per input (largest n,
    non-causal where present)."""
    inputs = sorted({r["input"] for r in rows})
    fig, axes = plotting.new_figure(ncols=len(inputs))
    n_max = max(r["n"] for r in rows)
    for ax, kind in zip(axes[0], inputs):
        sel = [r for r in rows if r["input"] == kind and r["n"] == n_max and not r["causal"] and r["method"] != "exact"]
        for name in sorted({r["method"] for r in sel}):
            pts = sorted((r["ratio_to_exact"], r["rel_fro"]) for r in sel if r["method"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=plotting.method_color(name), label=name)
        ax.axvline(1.0, color="black", ls="--", lw=0.8, label="exact time")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time / exact time (same run)")
        ax.set_ylabel("relative Frobenius error of output")
        ax.set_title(f"{kind}, n = {n_max}, non-causal")
        ax.legend()
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    parser.add_argument("--inputs", nargs="+", default=["gaussian", "clustered"], choices=SYNTHETIC_KINDS)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of registered methods (default all)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="n = 256 only, 1 repeat: finishes in seconds")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS, help="folder for compare.csv / compare_pareto.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = [256], 1
    torch.manual_seed(args.seed)
    rows = run_comparison(args.inputs, args.n, (False, True), args.methods, heads=args.heads,
                          head_dim=args.head_dim, seed=args.seed, repeats=args.repeats, device=args.device)
    print(markdown_table(rows))
    write_csv(rows, args.out / "compare.csv")
    print(f"wrote {args.out / 'compare.csv'} and {plot_pareto(rows, args.out / 'compare_pareto.png')}")
    return rows


if __name__ == "__main__":
    main()
