"""The comparison: every registered method against ``exact`` on the same inputs (what ``make demo`` runs).

For each input, each sequence length n, causal and non-causal, and each method at the budgets it declares
(``AttentionMethod.budgets(n)``, a few option sets of increasing work), it measures the output's relative
Frobenius and spectral errors, the KL divergence of attention rows where the method exposes its attention
matrix, the median time and its ratio to ``exact`` timed in the same run on the same input, and peak memory.
It prints a markdown table and writes ``compare.csv``, ``compare_pareto.png`` (error vs time, one curve per
method, one panel per input) and ``compare_scaling.png`` (time vs n, log-log, with n and n^2 slopes).

Inputs: ``gaussian`` and ``clustered`` (``common.data``), ``shakespeare`` (real q/k/v of the last layer of the
small nanoGPT model trained with exact attention on tiny Shakespeare, trained and cached on first use; the model's
block is short, so consecutive blocks of the validation text are captured and concatenated along the sequence),
and ``glove`` (q = k = the first n word vectors of ``--glove PATH``, v = the next n, as in KDEformer's
experiment).

    python -m common.compare --quick                      # about a minute on a 2-core CPU
    python -m common.compare                              # the default grid, under ten minutes
    python -m common.compare --n 1024 4096 16384 --inputs shakespeare
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from . import plotting
from .bench import evaluate_methods
from .data import QKV, load_glove, synthetic_qkv
from .registry import available, method_class

INPUTS = ("gaussian", "clustered", "shakespeare", "glove")
CSV_FIELDS = ["input", "n", "causal", "method", "options", "time_s", "ratio_to_exact", "rel_fro", "rel_spec",
              "max_abs", "kl", "peak_mem_bytes"]


def shakespeare_qkv(n: int, layer: int = -1, dtype=torch.float32, device="cpu", progress=True) -> QKV:
    """Real q/k/v (1, H, n, D) of one layer of the quick nanoGPT model on the validation text."""
    from nanoGPT.capture_qkv import capture_qkv
    from nanoGPT.data_loader import load_split
    from nanoGPT.quick_model import get_quick_model

    model, _ = get_quick_model(device="cpu", progress=progress)
    block = model.config.block_size
    n_blocks = math.ceil(n / block)
    val = torch.as_tensor(load_split("val")[: n_blocks * block].astype("int64"))
    if val.numel() < n_blocks * block:
        raise ValueError(f"shakespeare_qkv: the validation split has {val.numel()} tokens, fewer than n={n}")
    layer = layer % model.config.n_layer
    q, k, v = capture_qkv(model, val.view(n_blocks, block), layer)  # (n_blocks, H, block, D)
    join = lambda t: t.permute(1, 0, 2, 3).reshape(1, t.shape[1], n_blocks * block, t.shape[-1])[:, :, :n]
    return QKV(*(join(t).to(dtype=dtype, device=device) for t in (q, k, v)),
               source=f"nanoGPT quick model, layer {layer}, {n_blocks} validation blocks of {block} tokens")


def glove_qkv(path: Path, n: int, dtype=torch.float32, device="cpu") -> QKV:
    """q = k = the first n word vectors, v = the next n (KDEformer, Sec. 5.1 uses GloVe this way)."""
    _, vectors = load_glove(path, max_words=2 * n)
    if vectors.shape[0] < 2 * n:
        raise ValueError(f"glove_qkv: {path} holds {vectors.shape[0]} vectors, need 2n = {2 * n}")
    qk = vectors[:n].view(1, 1, n, -1).to(dtype=dtype, device=device)
    return QKV(qk, qk.clone(), vectors[n:2 * n].view(1, 1, n, -1).to(dtype=dtype, device=device), source=str(path))


def make_input(kind: str, n: int, *, heads: int, head_dim: int, seed: int, glove: Path | None, dtype, device,
               progress: bool = True) -> QKV:
    if kind in ("gaussian", "clustered"):
        return synthetic_qkv(kind, 1, heads, n, n, head_dim, seed=seed, dtype=dtype, device=device)
    if kind == "shakespeare":
        return shakespeare_qkv(n, dtype=dtype, device=device, progress=progress)
    if kind == "glove":
        if glove is None:
            raise ValueError("compare: input 'glove' needs --glove PATH (a GloVe-format text file)")
        return glove_qkv(glove, n, dtype=dtype, device=device)
    raise ValueError(f"compare: unknown input {kind!r}; expected one of {INPUTS}")


def default_inputs() -> list[str]:
    """The synthetic inputs, plus real Shakespeare q/k/v when the nanoGPT package that makes them is present."""
    return ["gaussian", "clustered"] + (["shakespeare"] if importlib.util.find_spec("nanoGPT.quick_model") else [])


def comparison_grid(inputs, ns, causal_modes, methods=None) -> list[tuple]:
    """All (input, n, causal, method, options) to run; methods that refuse causal are left out of causal."""
    names = available()
    methods = list(methods or names)
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise ValueError(f"compare: unknown method(s) {unknown}; available: {names}")
    grid = []
    for kind in inputs:
        for n in ns:
            for causal in causal_modes:
                for name in methods:
                    cls = method_class(name)
                    if name == "exact" or (causal and not cls.supports_causal):
                        continue
                    for options in cls.budgets(n):
                        grid.append((kind, n, causal, name, options))
    return grid


def run_comparison(inputs=("gaussian", "clustered"), ns=(1024,), causal_modes=(False, True), methods=None, *,
                   heads=4, head_dim=64, seed=0, repeats=3, glove=None, dtype=torch.float32, device="cpu",
                   progress=True) -> list[dict]:
    """Run the grid; one row per (input, n, causal, method, budget), plus exact's own row per cell."""
    grid = comparison_grid(inputs, ns, causal_modes, methods)
    rows = []
    bar = tqdm(total=len(grid), desc="compare", disable=not progress)
    for kind in inputs:
        for n in ns:
            x = make_input(kind, n, heads=heads, head_dim=head_dim, seed=seed, glove=glove, dtype=dtype,
                           device=device, progress=progress)
            for causal in causal_modes:
                cell = [(name, opts) for (g_kind, g_n, g_causal, name, opts) in grid
                        if (g_kind, g_n, g_causal) == (kind, n, causal)]
                cell = [(name, {**opts, "seed": seed} if method_class(name).randomized else opts)
                        for name, opts in cell]
                bar.set_postfix_str(f"{kind} n={n} causal={causal}")
                cell_rows = evaluate_methods(cell, x.q, x.k, x.v, causal=causal, repeats=repeats,
                                             on_row=lambda row: bar.update(row["method"] != "exact"))
                rows += [{"input": kind, "n": n, "causal": causal, **row} for row in cell_rows]
    bar.close()
    return rows


def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "seed") or "-"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (times in ms, errors in %, peak memory in MiB)."""
    lines = ["| input | n | causal | method | options | time (ms) | time / exact | rel. Frobenius err "
             "| rel. spectral err | KL rows | peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.3g}"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2 ** 20:.1f}"
        lines.append(f"| {r['input']} | {r['n']} | {r['causal']} | {r['method']} | {_fmt_options(r['options'])} "
                     f"| {1e3 * r['time_s']:.2f} | {r['ratio_to_exact']:.2f} | {100 * r['rel_fro']:.2f}% "
                     f"| {100 * r['rel_spec']:.2f}% | {kl} | {mem} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r[k] for k in CSV_FIELDS}, "options": json.dumps(r["options"])})
    return path


def read_csv(paths) -> list[dict]:
    """Rows written by :func:`write_csv` (e.g. by runs on another machine), typed again."""
    rows = []
    for path in paths:
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                rows.append({**r, "n": int(r["n"]), "causal": r["causal"] == "True", "options": json.loads(r["options"]),
                             **{k: float(r[k]) for k in ("time_s", "ratio_to_exact", "rel_fro", "rel_spec", "max_abs")},
                             "kl": float(r["kl"]) if r["kl"] else None,
                             "peak_mem_bytes": int(r["peak_mem_bytes"]) if r["peak_mem_bytes"] else None})
    return rows


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
        ax.set_title(f"{kind}, n = {n_max}, {'causal' if causal else 'non-causal'}")
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
    ax.set_title(f"{kind}, {'causal' if causal else 'non-causal'}, cheapest budget")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: the curves fill the whole panel
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Compare every registered attention method against exact.")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    parser.add_argument("--inputs", nargs="+", default=default_inputs(), choices=INPUTS,
                        help="default: gaussian, clustered, and shakespeare once nanoGPT.quick_model exists")
    parser.add_argument("--glove", type=Path, default=None, help="GloVe-format file; adds the 'glove' input")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of registered methods (default: all)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--heads", type=int, default=4, help="heads of the synthetic inputs")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of the synthetic inputs")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="n = 256 and 1024, one timed run")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS, help="folder for the CSV and figures")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from_csv", type=Path, nargs="+", default=None,
                        help="run nothing: merge these compare.csv files (e.g. from a GPU) and re-plot them")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = [256, 1024], 1
    inputs = list(args.inputs) + (["glove"] if args.glove and "glove" not in args.inputs else [])
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    torch.manual_seed(args.seed)
    if args.from_csv:
        rows = read_csv(args.from_csv)
    else:
        rows = run_comparison(inputs, args.n, causal_modes, args.methods, heads=args.heads, head_dim=args.head_dim,
                              seed=args.seed, repeats=args.repeats, glove=args.glove, device=args.device,
                              progress=not args.no_progress)
    print(markdown_table(rows))
    written = [write_csv(rows, args.out / "compare.csv"), plot_pareto(rows, args.out / "compare_pareto.png")]
    if len({r["n"] for r in rows}) > 1:
        written.append(plot_scaling(rows, args.out / "compare_scaling.png"))
    print("wrote " + ", ".join(map(str, written)))
    return rows


if __name__ == "__main__":
    main()
