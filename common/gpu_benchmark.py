"""Every GPU measurement in one run: each registered method against exact SDPA in the same dtype at long n.

    python -m common.gpu_benchmark --out /tmp/gpu                  # on a GPU: n = 16k .. 256k, bf16, one CSV
    python -m common.gpu_benchmark --quick --device cpu --out /tmp/g  # the same code at tiny n on the CPU
    python -m common.gpu_benchmark --from_csv a/gpu_benchmark.csv b/gpu_benchmark.csv --out assets/gpu  # merge, plot

For each n (default 16,384, 65,536, 131,072, 262,144), non-causal and causal, on one input (B = 1, H = 8, D = 64,
the registered input source ``--input``, ``clustered`` by default) in ``--dtype`` (bfloat16 by default):

- ``exact`` (SDPA: the flash kernel on a GPU in half precision) is timed first; every other row's ratio is to it,
  timed in the same run on the same input in the same dtype. Exact's time on a float32 copy of the input is the
  extra column ``exact_fp32_time_s``, never a denominator.
- every other registered method (causal runs: those that can run causal) at one budget: the middle one of the
  option sets it declares (``common.budget_options``, seeded), ``--budget`` picks another;
- forward time: the median of at least ``--repeats`` (5) timed calls after a warm-up call, each synchronised
  (``torch.cuda.synchronize``); causal rows of trainable methods also time forward + backward the same way;
- error: the relative Frobenius / spectral error of the output on a subsample of ``--error-rows`` query rows,
  against exact attention computed in float32 for those rows only (so it fits in memory at any n);
- a method that fails (out of memory, an error, more than ``--row-time-limit`` seconds for its row) gets a row
  with the message and the run goes on; it is not run again at a larger n. The CSV is rewritten after every row,
  so a run stopped from outside keeps what it measured; once ``--time-budget`` is spent, the rows not started are
  written as skipped.
  A markdown table is printed at the end.

The figure (``gpu_benchmark.png``: forward time vs n per method, log-log, with exact in the run's dtype and in
float32; one panel non-causal, one causal) is drawn from the CSV.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics, plotting
from .attention import causal_query_positions
from .bench import time_callable, time_within
from .cli import write_table
from .data import InputSpec, input_sources, make_input
from .registry import budget_options, get_attention, method_class, methods as registered_methods

NS = (16384, 65536, 131072, 262144)
QUICK_NS = (64, 128)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CSV_FIELDS = ["n", "causal", "dtype", "method", "budget", "options", "status", "message", "fwd_time_s", "fwd_ratio_to_exact",
              "fwd_repeats", "exact_fwd_time_s", "exact_fp32_time_s", "fwd_bwd_time_s", "fwd_bwd_ratio_to_exact",
              "exact_fwd_bwd_time_s", "rel_fro", "rel_spec", "error_rows", "peak_mem_bytes", "device", "torch"]
REFERENCE_CHUNK = 256  # query rows per exact-reference call


class RowTimeout(Exception):
    """A row ran past its time limit."""


@contextmanager
def time_limit(seconds: float):
    """Raise RowTimeout in this (main) thread after ``seconds``; where no alarm can be set (another thread), none."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise RowTimeout(f"ran past the row time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


BUDGETS = ("low", "mid", "high")


def chosen_budgets(name: str, n: int, seed: int, budget: str) -> list[tuple[str, dict]]:
    """The (label, options) pairs ``name`` runs with: the first, middle or last of its declared budgets at n
    (seeded), or, with ``budget="all"``, each of the three (fewer where the method declares fewer)."""
    options = budget_options(name, n, seed)
    picks = {"low": 0, "mid": len(options) // 2, "high": len(options) - 1}
    labels = BUDGETS if budget == "all" else (budget,)
    chosen: dict[int, str] = {}
    for label in labels:
        chosen.setdefault(picks[label], label)
    return [(label, options[i]) for i, label in sorted(chosen.items())]


def sample_rows(n: int, m: int, seed: int, device) -> torch.Tensor:
    """``min(m, n)`` distinct query positions, sorted, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:m].sort().values.to(device)


def exact_rows(q, k, v, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """Exact softmax attention in float32 for the query positions ``rows`` only: (B, H, len(rows), Dv)."""
    n_keys = k.shape[-2]
    positions = causal_query_positions(q.shape[-2], n_keys, q.device)[rows]
    k32, v32 = k.float(), v.float()
    out = []
    for start in range(0, rows.numel(), REFERENCE_CHUNK):
        chunk = rows[start:start + REFERENCE_CHUNK]
        mask = None
        if causal:
            mask = torch.arange(n_keys, device=q.device) <= positions[start:start + REFERENCE_CHUNK, None]
        out.append(F.scaled_dot_product_attention(q[:, :, chunk].float(), k32, v32, attn_mask=mask))
    return torch.cat(out, dim=2)


def device_name(device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``) or "cpu": the ``device`` column of a measurement."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bytes(device, baseline: int) -> int | None:
    """Peak CUDA memory since the last :func:`free_memory`, above ``baseline`` (the inputs'); None on the CPU."""
    return torch.cuda.max_memory_allocated(device) - baseline if torch.device(device).type == "cuda" else None


def free_memory(device) -> int:
    """Release cached CUDA memory, restart the peak count; return the memory still allocated (0 on the CPU)."""
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def exact_fp32_time(exact, q, k, v, causal: bool, *, repeats: int, row_time_limit: float, device) -> float | None:
    """Exact attention's median time on a float32 copy of the input: an extra column only, never a denominator,
    so a float32 run that fails or runs out of time leaves the column empty instead of losing the cell."""
    try:
        with time_limit(row_time_limit):
            q32, k32, v32 = (t.float() for t in (q, k, v))
            return time_callable(lambda: exact(q32, k32, v32, causal=causal), warmup=1, repeats=repeats,
                                 device=device).median_s
    except Exception:  # noqa: BLE001 - out of memory or time: the column stays empty
        return None
    finally:
        free_memory(device)


def measure(attn, q, k, v, *, causal: bool, repeats: int, fwd_bwd: bool, rows: torch.Tensor | None,
            reference: torch.Tensor | None, deadline: float, peak=lambda: None) -> dict:
    """Time one method's forward (and forward + backward) on one input and score its output on ``rows``.

    The warm-up call is also the scored one. If the warm-up shows that ``repeats`` timed calls would pass the
    ``deadline`` (a ``time.perf_counter`` value), fewer are made (at least one) and ``fwd_repeats`` says so.
    ``peak()`` reads the peak memory: ``peak_mem_bytes`` is that of forward + backward, or of the forward alone
    when the backward fails (out of memory, time): the forward's measurement is kept and ``message`` says why the
    forward + backward cell is empty."""
    device = q.device
    result = {}
    with torch.no_grad():
        out, timing = time_within(lambda: attn(q, k, v, causal=causal), repeats=repeats, deadline=deadline,
                                  device=device)
        if reference is not None:
            approx = out[:, :, rows]
            result["rel_fro"] = metrics.relative_frobenius_error(approx, reference)
            result["rel_spec"] = metrics.relative_spectral_error(approx, reference)
        del out
        result.update(fwd_time_s=timing.median_s, fwd_repeats=len(timing.times_s))
    if fwd_bwd:
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        grad = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(0)).to(q)

        def step():
            for t in (qg, kg, vg):
                t.grad = None
            attn(qg, kg, vg, causal=causal).backward(grad)

        forward_peak = peak()
        try:
            _, timing = time_within(step, repeats=repeats, deadline=deadline, device=device)
            result["fwd_bwd_time_s"] = timing.median_s
        except Exception as err:  # noqa: BLE001 - the backward's failure empties its cell, not the row
            del qg, kg, vg, grad
            free_memory(device)
            return {**result, "peak_mem_bytes": forward_peak,
                    "message": f"forward + backward {failure_status(err)}: {failure_message(err)}"}
    return {**result, "peak_mem_bytes": peak()}


def run_benchmark(ns=NS, causal_modes=(False, True), methods=None, *, source: str = "clustered", heads: int = 8,
                  head_dim: int = 64, dtype=torch.bfloat16, device="cuda", repeats: int = 5, budget: str = "mid",
                  error_rows: int = 1024, row_time_limit: float = 60.0, time_budget: float | None = None,
                  seed: int = 0, on_row=None) -> list[dict]:
    """All rows of the benchmark (see the module docstring); ``on_row(rows)`` is called after each new row. Once
    ``time_budget`` seconds have passed, the rows not started are written as skipped instead of run."""
    stop_at = math.inf if time_budget is None else time.perf_counter() + time_budget
    names = registered_methods()
    unknown = [m for m in (methods or []) if m not in names]
    if unknown:
        raise ValueError(f"gpu_benchmark: unknown method(s) {unknown}; available: {names}")
    dtype_name = str(dtype).removeprefix("torch.")
    common_fields = {"dtype": dtype_name, "device": device_name(device), "torch": torch.__version__}
    failed: dict[tuple[str, bool, str], str] = {}  # (method, causal, budget) -> why it stopped
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append({field: None for field in CSV_FIELDS} | common_fields | row)
        if on_row is not None:
            on_row(rows)

    spent = f"time budget of {time_budget:g} s spent" if time_budget is not None else ""
    for n in ns:
        if time.perf_counter() > stop_at:
            for causal in causal_modes:
                for name in registered_methods(causal=causal):
                    if name == "exact":
                        add({"n": n, "causal": causal, "method": name, "options": {}, "status": "skipped",
                             "message": spent})
                    elif not methods or name in methods:
                        for label, options in chosen_budgets(name, n, seed, budget):
                            add({"n": n, "causal": causal, "method": name, "budget": label, "options": options,
                                 "status": "skipped", "message": spent})
            continue
        x = make_input(source, n, InputSpec(heads=heads, head_dim=head_dim, seed=seed, dtype=dtype, device=device,
                                            progress=False))
        q, k, v = x.q, x.k, x.v
        rows_idx = sample_rows(n, error_rows, seed, device)
        for causal in causal_modes:
            cell = {"n": n, "causal": causal}
            others = [m for m in registered_methods(causal=causal) if m != "exact" and (not methods or m in methods)]
            baseline = free_memory(device)
            try:  # the reference values and times of this cell: exact in float32 on the sampled rows, exact timed
                with time_limit(row_time_limit):
                    reference = exact_rows(q, k, v, rows_idx, causal)
                    exact = get_attention("exact").to(device)
                    deadline = time.perf_counter() + row_time_limit
                    ref = measure(exact, q, k, v, causal=causal, repeats=repeats, fwd_bwd=causal, rows=rows_idx,
                                  reference=reference, deadline=deadline, peak=lambda: peak_bytes(device, baseline))
            except Exception as err:  # noqa: BLE001 - the run goes on; the row says what happened
                add({**cell, "method": "exact", "options": {}, "status": failure_status(err), "message": failure_message(err)})
                for name in others:
                    for label, options in chosen_budgets(name, n, seed, budget):
                        add({**cell, "method": name, "budget": label, "options": options, "status": "skipped",
                             "message": "no exact reference in this cell"})
                free_memory(device)
                continue
            fp32 = exact_fp32_time(exact, q, k, v, causal, repeats=max(1, min(repeats, ref["fwd_repeats"])),
                                   row_time_limit=row_time_limit, device=device)
            exact_times = {"exact_fwd_time_s": ref["fwd_time_s"], "exact_fp32_time_s": fp32,
                           "exact_fwd_bwd_time_s": ref.get("fwd_bwd_time_s")}
            add({**cell, "method": "exact", "options": {}, "status": "ok", **ref, **exact_times,
                 "fwd_ratio_to_exact": 1.0, "fwd_bwd_ratio_to_exact": 1.0 if ref.get("fwd_bwd_time_s") else None,
                 "error_rows": rows_idx.numel()})
            for name, (label, options) in [(m, b) for m in others for b in chosen_budgets(m, n, seed, budget)]:
                baseline = free_memory(device)
                row = {**cell, "method": name, "budget": label, "options": options, **exact_times}
                if (name, causal, label) in failed or time.perf_counter() > stop_at:
                    add({**row, "status": "skipped", "message": failed.get((name, causal, label), spent)})
                    continue
                fwd_bwd = causal and method_class(name).trainable
                try:
                    with time_limit(row_time_limit):
                        attn = get_attention(name, **options).to(device)
                        result = measure(attn, q, k, v, causal=causal, repeats=repeats, fwd_bwd=fwd_bwd,
                                         rows=rows_idx, reference=reference,
                                         deadline=time.perf_counter() + row_time_limit,
                                         peak=lambda: peak_bytes(device, baseline))
                except Exception as err:  # noqa: BLE001 - OOM, an error or the time limit: a row, not an abort
                    failed[name, causal, label] = f"{failure_status(err)} at n={n}"
                    add({**row, "status": failure_status(err), "message": failure_message(err)})
                    continue
                add({**row, "status": "ok", **result, "error_rows": rows_idx.numel(),
                     "fwd_ratio_to_exact": result["fwd_time_s"] / ref["fwd_time_s"],
                     "fwd_bwd_ratio_to_exact": (result["fwd_bwd_time_s"] / ref["fwd_bwd_time_s"])
                     if result.get("fwd_bwd_time_s") and ref.get("fwd_bwd_time_s") else None})
                del attn
        del q, k, v, x
        free_memory(device)
    return rows


def failure_status(err: BaseException) -> str:
    """The ``status`` of a row whose measurement raised ``err``: "timeout", "oom" or "error"."""
    if isinstance(err, RowTimeout):
        return "timeout"
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom"
    return "error"


def failure_message(err: BaseException) -> str:
    """One line for a failed row's ``message``: the exception's type, its first line and where it was raised."""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{at}"[:300]


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, CSV_FIELDS)


def read_csv(path) -> list[dict]:
    """Rows written by :func:`write_csv`, typed again (empty cells are None)."""
    floats = ("fwd_time_s", "fwd_ratio_to_exact", "exact_fwd_time_s", "exact_fp32_time_s", "fwd_bwd_time_s",
              "fwd_bwd_ratio_to_exact", "exact_fwd_bwd_time_s", "rel_fro", "rel_spec")
    ints = ("n", "fwd_repeats", "error_rows", "peak_mem_bytes")
    rows = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            missing = [k for k in CSV_FIELDS if k not in r and k != "budget"]  # runs before "budget" existed
            if missing:
                raise ValueError(f"gpu_benchmark: {path} lacks the column(s) {missing}")
            rows.append({**r, "causal": r["causal"] == "True", "options": json.loads(r["options"]),
                         "budget": r.get("budget") or None,
                         "message": r["message"] or None,
                         **{k: float(r[k]) if r[k] else None for k in floats},
                         **{k: int(r[k]) if r[k] else None for k in ints}})
    return rows


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(err) -> str:
    return "-" if err is None else f"{100 * err:.1f}%"


def markdown_table(rows: list[dict]) -> str:
    """One line per row: times in ms, ratios to exact in the run's dtype, errors in % on the sampled rows."""
    lines = ["| n | causal | method | budget | options | fwd (ms) | fwd / exact | fwd+bwd (ms) | fwd+bwd / exact "
             "| exact fp32 (ms) | rel. Frobenius err | rel. spectral err | peak mem (MiB) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "seed") or "-"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2 ** 20:.0f}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['message']}"
        lines.append(f"| {r['n']} | {r['causal']} | {r['method']} | {r['budget'] or '-'} | {options} | {_ms(r['fwd_time_s'])} "
                     f"| {_x(r['fwd_ratio_to_exact'])} | {_ms(r['fwd_bwd_time_s'])} | {_x(r['fwd_bwd_ratio_to_exact'])} "
                     f"| {_ms(r['exact_fp32_time_s'])} | {_pct(r['rel_fro'])} | {_pct(r['rel_spec'])} | {mem} "
                     f"| {status} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Forward time vs n (log-log) per method at its middle budget (the only one where a run measured one),
    exact in the run's dtype (black) and in float32 (dashed); one panel per causal mode."""
    modes = sorted({r["causal"] for r in rows})
    fig, axes = plotting.new_figure(ncols=len(modes))
    for ax, causal in zip(axes[0], modes):
        sel = [r for r in rows if r["causal"] == causal and r["status"] == "ok" and r.get("budget") in (None, "mid")]
        for name in [m for m in registered_methods() if any(r["method"] == m for r in sel)]:
            pts = sorted((r["n"], r["fwd_time_s"]) for r in sel if r["method"] == name)
            label = f"exact ({sel[0]['dtype']}, SDPA)" if name == "exact" else name
            ax.plot(*zip(*pts), "o-", color=plotting.method_color(name), label=label, lw=2 if name == "exact" else 1)
        fp32 = sorted({(r["n"], r["exact_fp32_time_s"]) for r in sel
                       if r["method"] == "exact" and r["exact_fp32_time_s"] is not None})
        if fp32:
            ax.plot(*zip(*fp32), "s--", color=plotting.method_color("exact"), mfc="white", label="exact (float32)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_ylabel("median forward time (s)")
        devices = sorted({r["device"] for r in rows})
        ax.set_title(f"{'causal' if causal else 'non-causal'}, {', '.join(sorted({r['dtype'] for r in rows}))}, "
                     f"{', '.join(devices)}")
    legend = {}  # every method of every panel, once (a method may run in one causal mode only)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0][-1].legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.02, 0.5))
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_benchmark.csv and the figure")
    parser.add_argument("--n", type=int, nargs="+", default=None, help=f"sequence lengths (default {NS})")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of registered methods (default: all)")
    parser.add_argument("--input", default="clustered", choices=input_sources(), help="registered input source")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement after a warm-up (median; default 5, 2 with --quick)")
    parser.add_argument("--budget", choices=[*BUDGETS, "all"], default="mid",
                        help="which of each method's declared budgets runs ('all': a row for each of the three)")
    parser.add_argument("--error-rows", type=int, default=None,
                        help="query rows on which the error is computed (default 1024, 64 with --quick)")
    parser.add_argument("--row-time-limit", type=float, default=60.0, help="seconds per row before it is given up")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run; rows not started by then are written as skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"n = {QUICK_NS}, 2 heads of dim 16, 2 repeats, 64 error rows")
    parser.add_argument("--from_csv", type=Path, nargs="+", default=None,
                        help="run nothing: merge these CSVs (e.g. two runs over different --n) into --out and plot")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    error_rows = args.error_rows if args.error_rows is not None else (64 if args.quick else 1024)
    if repeats < 1 or error_rows < 1:
        parser.error("--repeats and --error-rows must be >= 1")
    if args.from_csv:
        rows = [row for path in args.from_csv for row in read_csv(path)]
    else:
        ns = args.n or (QUICK_NS if args.quick else NS)
        heads, head_dim = (2, 16) if args.quick else (args.heads, args.head_dim)
        causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
        csv_path = args.out / "gpu_benchmark.csv"

        def progress(rows):
            r = rows[-1]
            print(f"n={r['n']} causal={r['causal']} {r['method']}: {r['status']} fwd {_ms(r['fwd_time_s'])} ms "
                  f"({_x(r['fwd_ratio_to_exact'])}) err {_pct(r['rel_fro'])} {r['message'] or ''}", flush=True)
            write_csv(rows, csv_path)

        rows = run_benchmark(ns, causal_modes, args.methods, source=args.input, heads=heads, head_dim=head_dim,
                             dtype=DTYPES[args.dtype], device=args.device, repeats=repeats, budget=args.budget,
                             error_rows=error_rows, row_time_limit=args.row_time_limit,
                             time_budget=args.time_budget, seed=args.seed, on_row=progress)
    print(markdown_table(rows))
    written = [write_csv(rows, args.out / "gpu_benchmark.csv"), plot(rows, args.out / "gpu_benchmark.png")]
    print("wrote " + ", ".join(map(str, written)))
    return rows


if __name__ == "__main__":
    main()
