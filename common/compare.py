"""The comparison: every registered method against ``exact`` on the same inputs (what ``make demo`` runs).

For each input, each sequence length n, causal and non-causal, and each method at the budgets it declares
(``common.budget_options``: a few option sets of increasing work, seeded where the method is randomised; causal
runs take ``common.methods(causal=True)``), it measures the output's relative Frobenius and spectral errors, the KL
divergence of attention rows where the method exposes its attention matrix, the median time and its ratio to
``exact`` timed in the same run on the same input and in the same dtype, and peak memory. It prints a markdown
table and writes ``compare.csv``, ``compare_pareto.png`` (error vs time, one curve per method, one panel per input)
and ``compare_scaling.png`` (time vs n, log-log, with n and n^2 slopes).

``--dtype bfloat16`` (or float16) runs every method, ``exact`` (SDPA, the flash kernel on a GPU) included, in that
dtype, and every ratio is to exact in that dtype; exact's time on a float32 copy of the same input is the extra
column ``exact_fp32_time_s``, never a denominator. Errors are to exact attention computed in float32 on the same
(rounded) inputs, so the ``exact`` row shows the dtype's own rounding error.

Inputs are the input sources registered by name (``common.data.input_sources``): ``gaussian`` and ``clustered``
(synthetic), ``glove`` (``--glove PATH``: q = k = the first n word vectors, v = the next n, as in KDEformer's
experiment), and those that other packages register in their ``qkv_source.py`` (``shakespeare``: real q/k/v of a
small GPT trained on tiny Shakespeare, registered by the GPT package; with ``--quick`` from a small committed
model, so that nothing is trained). This module imports none of those packages; see ``common.data``.

Each time is the median of at least ``--repeats`` timed calls after a warm-up call, repeated further while the
timed calls add up to less than ``--min-time`` seconds: the fast calls, whose single timings are the noisiest, are
timed many times, so that a series over n keeps its order (``--quick``: at least one timed call and 50 ms of them;
the default: at least three and 100 ms).

    python -m common.compare --quick                      # n = 256, 512, non-causal, nothing trained; out/compare_quick/
    python -m common.compare                              # the default grid, about ten minutes
    python -m common.compare --n 1024 4096 16384 --inputs shakespeare
    python -m common.compare --device cuda --dtype bfloat16 --n 4096 16384 --inputs gaussian clustered
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from . import plotting
from .bench import evaluate_methods
from .cli import write_table
from .data import InputSpec, input_sources, make_input
from .registry import available, budget_options, methods as registered_methods

CSV_FIELDS = ["input", "n", "causal", "dtype", "method", "options", "time_s", "ratio_to_exact", "exact_fp32_time_s",
              "rel_fro", "rel_spec", "max_abs", "kl", "peak_mem_bytes"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_OUT = Path("out/compare_quick")  # ignored by git: --quick is a check, not a result to commit


def comparison_grid(inputs, ns, causal_modes, methods=None, seed: int = 0) -> list[tuple]:
    """All (input, n, causal, method, options) to run, ``exact`` excepted (it is every cell's reference): each
    method at each of its budgets; causal cells hold only the methods that can run causal."""
    names = available()
    methods = list(methods or names)
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise ValueError(f"compare: unknown method(s) {unknown}; available: {names}")
    grid = []
    for kind in inputs:
        for n in ns:
            for causal in causal_modes:
                for name in registered_methods(causal=causal):
                    if name != "exact" and name in methods:
                        grid += [(kind, n, causal, name, options) for options in budget_options(name, n, seed)]
    return grid


def run_comparison(inputs=("gaussian", "clustered"), ns=(1024,), causal_modes=(False, True), methods=None, *,
                   spec: InputSpec = InputSpec(), repeats=3, min_time_s=0.0, progress=True) -> list[dict]:
    """Run the grid on the inputs made by ``spec``; one row per (input, n, causal, method, budget), plus exact's
    own row per cell."""
    grid = comparison_grid(inputs, ns, causal_modes, methods, spec.seed)
    rows = []
    bar = tqdm(total=len(grid), desc="compare", disable=not progress)
    dtype_name = str(spec.dtype).removeprefix("torch.")
    for kind in inputs:
        for n in ns:
            x = make_input(kind, n, spec)
            for causal in causal_modes:
                cell = [(name, opts) for (g_kind, g_n, g_causal, name, opts) in grid
                        if (g_kind, g_n, g_causal) == (kind, n, causal)]
                bar.set_postfix_str(f"{kind} n={n} causal={causal}")
                cell_rows = evaluate_methods(cell, x.q, x.k, x.v, causal=causal, repeats=repeats,
                                             min_time_s=min_time_s, time_fp32_exact=True,
                                             on_row=lambda row: bar.update(row["method"] != "exact"))
                rows += [{"input": kind, "n": n, "causal": causal, "dtype": dtype_name, **row} for row in cell_rows]
    bar.close()
    return rows


def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "seed") or "-"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (times in ms, errors in %, peak memory in MiB)."""
    lines = ["| input | n | causal | dtype | method | options | time (ms) | time / exact | exact fp32 (ms) "
             "| rel. Frobenius err | rel. spectral err | KL rows | peak mem (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.3g}"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2 ** 20:.1f}"
        fp32 = "-" if r["exact_fp32_time_s"] is None else f"{1e3 * r['exact_fp32_time_s']:.2f}"
        lines.append(f"| {r['input']} | {r['n']} | {r['causal']} | {r['dtype']} | {r['method']} "
                     f"| {_fmt_options(r['options'])} | {1e3 * r['time_s']:.2f} | {r['ratio_to_exact']:.2f} | {fp32} "
                     f"| {100 * r['rel_fro']:.2f}% | {100 * r['rel_spec']:.2f}% | {kl} | {mem} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, CSV_FIELDS)


def read_csv(paths) -> list[dict]:
    """Rows written by :func:`write_csv` (e.g. by runs on another machine), typed again."""
    optional = lambda value, kind: kind(value) if value else None
    rows = []
    for path in paths:
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                missing = [k for k in CSV_FIELDS if k not in r]
                if missing:
                    raise ValueError(f"compare: {path} lacks the column(s) {missing} (not written by this version)")
                rows.append({**r, "n": int(r["n"]), "causal": r["causal"] == "True", "options": json.loads(r["options"]),
                             **{k: float(r[k]) for k in ("time_s", "ratio_to_exact", "rel_fro", "rel_spec", "max_abs")},
                             "exact_fp32_time_s": optional(r["exact_fp32_time_s"], float),
                             "kl": optional(r["kl"], float), "peak_mem_bytes": optional(r["peak_mem_bytes"], int)})
    return rows


def _one_dtype(rows: list[dict]) -> str:
    dtypes = sorted({r["dtype"] for r in rows})
    if len(dtypes) != 1:
        raise ValueError(f"compare: a figure shows one dtype, the rows hold {dtypes}")
    return dtypes[0]


def plot_pareto(rows: list[dict], path: Path, causal: bool = False) -> Path:
    """Relative Frobenius error vs time / exact time at the largest n, one curve per method, a panel per input."""
    inputs = sorted({r["input"] for r in rows})
    fig, axes = plotting.new_figure(ncols=len(inputs))
    n_max = max(r["n"] for r in rows)
    for ax, kind in zip(axes[0], inputs):
        sel = [r for r in rows if r["input"] == kind and r["n"] == n_max and r["causal"] == causal
               and r["method"] != "exact"]
        for name in sorted({r["method"] for r in sel}):
            pts = sorted((r["ratio_to_exact"], max(r["rel_fro"], 1e-8)) for r in sel if r["method"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=plotting.method_color(name), label=name)
        ax.axvline(1.0, color="black", ls="--", lw=0.8, label="exact (time = 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time / exact time, same run (ratio)")
        ax.set_ylabel("relative Frobenius error of output")
        ax.set_title(f"{kind}, n = {n_max}, {'causal' if causal else 'non-causal'}, {_one_dtype(rows)}")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # one legend, outside the panels
    return plotting.save_figure(fig, path)


def plot_scaling(rows: list[dict], path: Path, causal: bool = False) -> Path:
    """Median time vs n (log-log) of each method at its cheapest budget, with n and n^2 reference slopes."""
    kind = sorted({r["input"] for r in rows})[0]
    sel = [r for r in rows if r["input"] == kind and r["causal"] == causal]
    fig, axes = plotting.new_figure()
    ax = axes[0][0]
    for name in sorted({r["method"] for r in sel}):
        by_n = {}
        for r in sel:
            if r["method"] == name:
                by_n[r["n"]] = min(by_n.get(r["n"], math.inf), r["time_s"])
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n] for n in ns], "o-", color=plotting.method_color(name), label=name)
    ns = sorted({r["n"] for r in sel})
    t0 = min(r["time_s"] for r in sel if r["n"] == ns[0])
    ax.plot(ns, [t0 * (n / ns[0]) for n in ns], "k:", lw=1, label="slope n")
    ax.plot(ns, [t0 * (n / ns[0]) ** 2 for n in ns], "k--", lw=1, label="slope n^2")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel("median time per call (s)")
    ax.set_title(f"{kind}, {'causal' if causal else 'non-causal'}, {_one_dtype(rows)}, cheapest budget")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: the curves fill the whole panel
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Compare every registered attention method against exact.")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="sequence lengths (default 1024 4096; 256 512 with --quick)")
    parser.add_argument("--inputs", nargs="+", default=None, choices=input_sources(),
                        help=f"registered input sources (default: {' '.join(input_sources(default_only=True))})")
    parser.add_argument("--glove", type=Path, default=None, help="GloVe-format file; adds the 'glove' input")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of registered methods (default: all)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default=None,
                        help="default both; no with --quick (the figures show non-causal)")
    parser.add_argument("--heads", type=int, default=4, help="heads of the synthetic inputs")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of the synthetic inputs")
    parser.add_argument("--repeats", type=int, default=None,
                        help="least timed calls per measurement (median; default 3, 1 with --quick)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="repeat a measurement's timed calls until they add up to this many seconds "
                             "(default 0.1; 0.05 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own; 1 with --quick, whose sizes are too small "
                             "for threads to pay and where spinning threads on a busy machine scramble the medians)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the inputs and of every method, exact included (the ratios' denominator)")
    parser.add_argument("--quick", action="store_true",
                        help="n = 256 and 512, non-causal, real q/k/v from a small committed model: about a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the CSV and figures (default {plotting.ASSETS}; with --quick {QUICK_OUT}, "
                             "so that a quick run never overwrites the committed full-grid results)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from_csv", type=Path, nargs="+", default=None,
                        help="run nothing: merge these compare.csv files (e.g. from a GPU) and re-plot them")
    args = parser.parse_args(argv)
    args.out = args.out or (QUICK_OUT if args.quick else plotting.ASSETS)
    args.n = args.n or ([256, 512] if args.quick else [1024, 4096])
    args.causal = args.causal or ("no" if args.quick else "both")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.1)
    inputs = list(args.inputs or input_sources(default_only=True))
    inputs += ["glove"] if args.glove and "glove" not in inputs else []
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if args.from_csv:
        rows = read_csv(args.from_csv)
    else:
        spec = InputSpec(heads=args.heads, head_dim=args.head_dim, seed=args.seed, dtype=DTYPES[args.dtype],
                         device=args.device, quick=args.quick, progress=not args.no_progress, path=args.glove)
        rows = run_comparison(inputs, args.n, causal_modes, args.methods, spec=spec, repeats=args.repeats,
                              min_time_s=args.min_time, progress=not args.no_progress)
    print(markdown_table(rows))
    written = [write_csv(rows, args.out / "compare.csv"), plot_pareto(rows, args.out / "compare_pareto.png")]
    if len({r["n"] for r in rows}) > 1:
        written.append(plot_scaling(rows, args.out / "compare_scaling.png"))
    print("wrote " + ", ".join(map(str, written)))
    return rows


if __name__ == "__main__":
    main()
