"""Issue 13's GPU check of the sampling and tree methods: time, peak memory and error against exact SDPA.

    python -m kdeformer.gpu_check --out /tmp/kde_gpu.csv                       # on a GPU (about 3 min on an H100)
    python -m kdeformer.gpu_check --quick --device cpu --out /tmp/kde_cpu.csv  # the same code at tiny n on the CPU

Cells (B = 1, H = 8, D = 64, the ``clustered`` input, ``--dtype`` bfloat16 by default), in this order: causal at
n = 131,072 and 262,144, non-causal at 131,072, causal at 16,384 (``--quick``: causal at 256 and 512, non-causal at
512). In each cell
exact attention (``torch.nn.functional.scaled_dot_product_attention`` in the same dtype: the flash kernel on a GPU)
is timed first, then each method of ``--methods`` (by registered name; default kdeformer, reformer, sblocal, uniform,
tree) at each budget it declares for n (``budgets(n)``, seeded), forward only, under ``torch.no_grad``:

- time: the median of up to ``--repeats`` synchronised calls after a warm-up call (fewer, at least one, when the
  warm-up shows they would not fit in the time left); ``ratio`` = time / exact's time in the same cell;
- peak memory: ``torch.cuda.max_memory_allocated`` during the method's calls, above what was allocated before
  (the inputs); empty on the CPU;
- error (at the cell's n when n <= ``--error-max-n``, 131,072 by default): the relative Frobenius error of the whole
  output against exact attention in float32;
- ``inner_products_per_query``: for a method that counts them (``last_inner_products``, tree), their mean over the
  queries of the last call.

A call that runs out of memory or fails gives a row with its status (``oom`` / ``error``) and message and the run
goes on (the same method and budget are not tried at a larger n); so does one that runs past ``--row-time-limit``
(``timeout``). Once ``--time-budget`` seconds are spent (the profiles included), the remaining rows are written as
``skipped``. The CSV is rewritten after every row.

Before the cells (unless ``--no-profile``), one profiled forward call each of kdeformer (causal and non-causal at
131,072) and tree (causal at 16,384), middle budget: the operators and kernels by device
time, with the methods' ``record_function`` stages, in ``<out>_profile.txt`` beside the CSV.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import metrics
from common.bench import _sync, time_within
from common.cli import write_table
from common.data import InputSpec, make_input
from common.gpu_benchmark import device_name, failure_message, failure_status, free_memory, peak_bytes, time_limit
from common.indexed_attention import indexed_attention, triton_indexed_attention
from common.registry import budget_options, get_attention

CELLS = ((131072, True), (262144, True), (131072, False), (16384, True))
QUICK_CELLS = ((256, True), (512, True), (512, False))
METHODS = ("kdeformer", "reformer", "sblocal", "uniform", "tree")
KERNEL_METHODS = ("kdeformer",)  # the methods with a ``kernel`` option (common.indexed_attention)
KERNELS = ("torch", "triton")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIELDS = ["n", "causal", "method", "budget", "kernel", "options", "status", "message", "time_s", "ratio_to_exact",
          "exact_time_s", "repeats", "peak_mem_bytes", "rel_fro", "inner_products_per_query", "dtype", "device",
          "torch"]


def timed(fn, device, repeats: int, deadline: float) -> tuple[object, float, int]:
    """(output of the warm-up call, median time of the timed calls, their number): :func:`common.bench.time_within`."""
    out, timing = time_within(fn, repeats=repeats, deadline=deadline, device=device)
    return out, timing.median_s, len(timing.times_s)


def run_check(cells=CELLS, methods=METHODS, *, dtype=torch.bfloat16, device="cuda", heads: int = 8, head_dim: int = 64,
              repeats: int = 3, error_max_n: int = 131072, time_budget: float = 170.0, row_time_limit: float = 30.0,
              seed: int = 0, kernels=KERNELS, on_row=None) -> list[dict]:
    """Every row of the check (module docstring); the methods of :data:`KERNEL_METHODS` once per kernel of
    ``kernels`` (same seed: the same draws), side by side; ``on_row(rows)`` after each new row."""
    device = torch.device(device)
    stop_at = time.perf_counter() + time_budget
    fields = {"dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "device": device_name(device)}
    rows, failed = [], {}

    def add(row):
        rows.append({f: None for f in FIELDS} | fields | row)
        if on_row is not None:
            on_row(rows)

    for n, causal in cells:
        cell = {"n": n, "causal": causal}
        plan = [(name, label, options | ({"kernel": kernel} if kernel else {})) for name in methods
                for label, options in zip(("low", "mid", "high"), budget_options(name, n, seed))
                for kernel in (kernels if name in KERNEL_METHODS else [None])]
        if time.perf_counter() > stop_at:
            add({**cell, "method": "exact", "options": {}, "status": "skipped", "message": "time budget spent"})
            for name, label, options in plan:
                add({**cell, "method": name, "budget": label, "kernel": options.get("kernel"), "options": options,
                     "status": "skipped", "message": "time budget spent"})
            continue
        x = make_input("clustered", n, InputSpec(heads=heads, head_dim=head_dim, seed=seed, dtype=dtype,
                                                 device=str(device), progress=False))
        q, k, v = x.q, x.k, x.v
        reference = None
        try:
            base = free_memory(device)
            with torch.no_grad():
                out, t_exact, reps = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), device,
                                           repeats, stop_at)
                peak = peak_bytes(device, base)  # before the float32 reference, which is not exact's own memory
                if n <= error_max_n:
                    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            add({**cell, "method": "exact", "options": {}, "status": "ok", "time_s": t_exact, "ratio_to_exact": 1.0,
                 "exact_time_s": t_exact, "repeats": reps, "peak_mem_bytes": peak,
                 "rel_fro": None if reference is None else metrics.relative_frobenius_error(out.float(), reference)})
            del out
        except Exception as err:  # noqa: BLE001 - a cell without its baseline still times the methods
            t_exact = None
            add({**cell, "method": "exact", "options": {}, "status": failure_status(err),
                 "message": failure_message(err)})
        for name, label, options in plan:
            row = {**cell, "method": name, "budget": label, "kernel": options.get("kernel"), "options": options,
                   "exact_time_s": t_exact}
            key = (name, label, options.get("kernel"))
            if key in failed or time.perf_counter() > stop_at:
                add({**row, "status": "skipped", "message": failed.get(key, "time budget spent")})
                continue
            attn = None
            try:
                base = free_memory(device)
                attn = get_attention(name, **options)
                with torch.no_grad(), time_limit(row_time_limit):
                    out, t, reps = timed(lambda: attn(q, k, v, causal=causal), device, repeats,
                                         min(stop_at, time.perf_counter() + row_time_limit))
                peak = peak_bytes(device, base)
                inner = getattr(attn, "last_inner_products", None)
                add({**row, "status": "ok", "time_s": t, "repeats": reps, "peak_mem_bytes": peak,
                     "ratio_to_exact": None if t_exact is None else t / t_exact,
                     "rel_fro": None if reference is None else metrics.relative_frobenius_error(out.float(),
                                                                                                reference),
                     "inner_products_per_query": None if inner is None else inner.double().mean().item()})
                del out
            except Exception as err:  # noqa: BLE001 - out of memory or an error: a row, and the run goes on
                failed[key] = f"{failure_status(err)} at n={n}, causal={causal}"
                add({**row, "status": failure_status(err), "message": failure_message(err)})
            finally:
                del attn
                free_memory(device)
        del q, k, v, x, reference
        free_memory(device)
    return rows


PROFILED = (("kdeformer", 131072, True, "triton"), ("kdeformer", 131072, False, "triton"),
            ("kdeformer", 131072, True, "torch"), ("tree", 16384, True, None))


def profile_table(name: str, n: int, causal: bool, kernel: str | None = None, *, dtype=torch.bfloat16, device="cuda",
                  heads: int = 8, head_dim: int = 64, seed: int = 0, rows: int = 25) -> str:
    """Where one forward call of ``name`` (middle budget, with ``kernel`` when given) spends its time:
    ``torch.profiler``'s operators and kernels (and the methods' ``record_function`` stages, e.g.
    ``kdeformer.block_attention``, and in it ``indexed_attention.gather``), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device)
    x = make_input("clustered", n, InputSpec(heads=heads, head_dim=head_dim, seed=seed, dtype=dtype,
                                             device=str(device), progress=False))
    options = budget_options(name, n, seed)
    options = options[len(options) // 2] | ({"kernel": kernel} if kernel else {})
    attn = get_attention(name, **options)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        attn(x.q, x.k, x.v, causal=causal)  # warm-up
        _sync(device)
        with profile(activities=activities) as prof:
            attn(x.q, x.k, x.v, causal=causal)
            _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    title = f"## {name} {options} n={n} causal={causal} {dtype} {device}"
    return title + "\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def gather_table(n: int = 131072, rows: int = 3 * 131072, *, heads: int = 8, head_dim: int = 64, dtype=torch.bfloat16,
                 device="cuda", repeats: int = 5) -> str:
    """Median times of four ways to gather ``rows`` random rows of a (heads * n, head_dim) table (the sampling
    methods' key and value gathers): ``index_select`` (``common.attention.gather_rows``), advanced indexing,
    ``torch.gather`` with the index expanded over the row, and ``embedding``."""
    device = torch.device(device)
    table = torch.randn(heads * n, head_dim, dtype=dtype, device=device)
    index = torch.randint(heads * n, (heads * rows,), device=device)
    ways = {"index_select": lambda: table.index_select(0, index), "advanced indexing": lambda: table[index],
            "gather (expanded index)": lambda: torch.gather(table, 0, index.view(-1, 1).expand(-1, head_dim)),
            "embedding": lambda: F.embedding(index, table)}
    lines = [f"## gathers of {heads} x {rows} rows of {head_dim} {dtype} from {heads} x {n} rows, {device}"]
    for name, fn in ways.items():
        _, t, _ = timed(fn, device, repeats, time.perf_counter() + 10)
        moved = 2 * index.numel() * head_dim * table.element_size()
        lines.append(f"{name}: {1e3 * t:.3f} ms ({moved / t / 1e9:.0f} GB/s read + written)")
    return "\n".join(lines)


KERNEL_CONFIGS = ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                  (128, 32, 4, 2), (64, 64, 4, 3))  # (block_m, block_n, num_warps, num_stages) of the kernel table


def kernel_table(n: int = 131072, chunk: int = 256, width: int = 2304, *, heads: int = 8, head_dim: int = 64,
                 dtype=torch.bfloat16, device="cuda", repeats: int = 5, seed: int = 0) -> str:
    """Median times of :func:`common.indexed_attention.indexed_attention` on the shape of causal KDEformer's tiles at
    the middle budget (n / ``chunk`` tiles of ``chunk`` query rows, ``width`` random key indices each with random
    log-weights, the last ``chunk`` the tile's own keys, block-causal): the torch kernel (gathers + SDPA) and the
    Triton kernel at each launch configuration of :data:`KERNEL_CONFIGS`, with the largest difference to the torch
    kernel's output."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    tiles = n // chunk
    index = torch.randint(n, (1, heads, tiles, width), generator=g, device=device)
    index[..., width - chunk:] = (torch.arange(tiles, device=device) * chunk).view(tiles, 1) + \
        torch.arange(chunk, device=device)
    log_weight = torch.rand(1, heads, tiles, width, generator=g, device=device) * 3
    lines = [f"## indexed_attention: {tiles} tiles x {chunk} rows x {width} keys (own chunk last, block-causal), "
             f"H = {heads}, D = {head_dim}, {dtype}, {device}"]
    ref = None
    runs = [("torch", lambda: indexed_attention(q, k, v, index, log_weight, diagonal=True, kernel="torch"))]
    for block_m, block_n, warps, stages in KERNEL_CONFIGS:
        runs.append((f"triton block_m={block_m} block_n={block_n} num_warps={warps} num_stages={stages}",
                     lambda c=(block_m, block_n, warps, stages): triton_indexed_attention(
                         q, k, v, index, log_weight, diagonal=True, block_m=c[0], block_n=c[1], num_warps=c[2],
                         num_stages=c[3])))
    for label, fn in runs:
        try:
            out, t, _ = timed(fn, device, repeats, time.perf_counter() + 10)
            ref = out.float() if ref is None else ref
            lines.append(f"{label}: {1e3 * t:.3f} ms, max |out - torch| = {(out.float() - ref).abs().max().item():.3g}")
        except Exception as err:  # noqa: BLE001 - a kernel that fails says why and the check goes on
            lines.append(f"{label}: {failure_message(err)}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, FIELDS)


def summary(rows: list[dict]) -> str:
    """A markdown table of the rows: time ratio to exact, peak memory, error, inner products."""
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines = ["| n | causal | method | budget | kernel | status | time (ms) | x exact | peak (GiB) | rel. err | inner prod. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 30
        lines.append(f"| {r['n']} | {r['causal']} | {r['method']} | {r.get('budget') or '-'} | {r.get('kernel') or '-'} | "
                     f"{r['status']} | "
                     f"{fmt(r['time_s'] and 1e3 * r['time_s'], '.2f')} | {fmt(r['ratio_to_exact'], '.3f')} | "
                     f"{fmt(peak, '.2f')} | {fmt(r['rel_fro'], '.3g')} | {fmt(r['inner_products_per_query'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                        help=f"the kernels of {', '.join(KERNEL_METHODS)} to time side by side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=170.0, help="seconds; rows not started are skipped")
    parser.add_argument("--error-max-n", type=int, default=131072, help="the error is measured up to this n")
    parser.add_argument("--row-time-limit", type=float, default=10.0, help="seconds per method, budget and cell")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles (<out>_profile.txt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="n = 256 and 512 (CPU-sized)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not args.no_profile:  # first, a few seconds: where the time goes in kdeformer's and tree's forward
        tables = []
        quick = [("kdeformer", 256, True, "torch"), ("kdeformer", 256, False, None), ("tree", 256, True, None)]
        for name, n, causal, kernel in (quick if args.quick else PROFILED):
            try:
                tables.append(profile_table(name, n, causal, kernel, dtype=DTYPES[args.dtype], device=args.device,
                                            seed=args.seed))
            except Exception as err:  # noqa: BLE001 - a profile that fails says why and the check goes on
                tables.append(f"## {name} n={n} causal={causal}: {failure_message(err)}")
            free_memory(torch.device(args.device))
        try:
            tables.append(gather_table(1024 if args.quick else 131072, 3072 if args.quick else 3 * 131072,
                                       dtype=DTYPES[args.dtype], device=args.device))
        except Exception as err:  # noqa: BLE001
            tables.append(f"## gathers: {failure_message(err)}")
        tables.append(kernel_table(1024, 64, 256, dtype=DTYPES[args.dtype], device=args.device) if args.quick else
                      kernel_table(dtype=DTYPES[args.dtype], device=args.device))
        path = args.out.with_name(args.out.stem + "_profile.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(tables) + "\n")
        print(f"wrote {path}")
    rows = run_check(QUICK_CELLS if args.quick else CELLS, args.methods, dtype=DTYPES[args.dtype], device=args.device,
                     repeats=args.repeats, error_max_n=args.error_max_n,
                     time_budget=args.time_budget - (time.perf_counter() - started),
                     row_time_limit=args.row_time_limit, seed=args.seed, kernels=args.kernels,
                     on_row=lambda rows: write_csv(rows, args.out))
    print(summary(rows))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
