"""GPU check of knn's on-device path (issue 13): ``index='ivf_blocks'`` (``block_routing.py``) against exact SDPA in
the same dtype, with its error beside every time, then knn's CUDA tests.

    python -m knn_attention.gpu_check --device cuda --out $OUT       # H100: n = 128k, 256k, bf16, < 4 min
    python -m knn_attention.gpu_check --quick --out /tmp/knn_check   # the same code on the CPU at tiny n

For each n and causal mode, on the benchmark's input (``common.gpu_benchmark``: the registered source ``clustered``,
B = 1, H = 8, D = 64, ``--dtype`` bfloat16): exact (``common``'s ``exact``, SDPA) is timed, then knn with the
options ``common.gpu_benchmark`` runs (the middle of ``KNNAttention.budgets(n)``, label ``mid``), the same with
estimator (a) (``mid-topk``) and the smallest budget (``low``); causal, in the default ``'segments'`` layout, and
``mid-mask`` / ``low-mask`` in the earlier ``'mask'`` layout (the old path beside the new). Times are medians of ``--repeats`` synchronised
calls after a warm-up; ``route_ms`` / ``attend_ms`` split one knn call into its index (k-means, sorting, routing,
draws) and its attention kernel. ``rel_fro``: relative Frobenius error on ``--error-rows`` sampled query rows
against exact attention in float32 (``common.gpu_benchmark.exact_rows``).

Then the error table (no timing) at moderate n (``--error-n``, default 4096) on three inputs, in float32:
``clustered`` (the benchmark's: 16 clusters, nearly flat rows over n / 16 keys), ``clustered_concentrated``
(n / 64 clusters, sharpness 2: rows concentrated on 64 keys, kNN attention's regime; as ``efficiency.py``) and
``gaussian``; for each knn config and, as the reference retrieval, the exact top-k (``index='torch'``) with k =
the routed budget.

Writes ``knn_gpu.csv`` (every row), ``knn_gpu.md`` (the same as a table), ``knn_gpu_profile.txt`` (torch.profiler
tables of one knn call at the largest n, non-causal and causal) and, with ``--pytest`` (default on a GPU),
``knn_gpu_pytest.txt``: the output of ``pytest tests/knn_attention -k "cuda or gpu"``.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import get_attention, metrics
from common.bench import _sync, time_callable
from common.cli import script_parser, write_table
from common.data import InputSpec, make_input, synthetic_qkv
from common.gpu_benchmark import device_name, exact_rows, failure_message, failure_status, sample_rows

from .block_routing import block_options, default_segment, route, routed_attention
from .forward_pass import KNNAttention, ivf_blocks_budgets

FIELDS = ["table", "n", "causal", "input", "dtype", "device", "config", "options", "status", "message", "fwd_ms",
          "exact_ms", "speedup", "rel_fro", "route_ms", "attend_ms", "peak_mib", "error_rows"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def configs(n: int, causal: bool = False) -> list[tuple[str, dict]]:
    """(label, knn options): the budget ``common.gpu_benchmark`` runs (``mid``: the middle of
    ``KNNAttention.budgets(n)``, which are :func:`ivf_blocks_budgets` from ``LONG_N`` keys on; at smaller n, as
    with --quick, the ivf_blocks budgets all the same), the same with estimator (a), the smallest budget; causal,
    these run the default ``'segments'`` layout, ``mid-L2`` the same with segments twice the default length, and
    ``mid-mask`` / ``low-mask`` the earlier ``'mask'`` layout (``block_routing.py``), the old path beside the new."""
    budgets = ivf_blocks_budgets(n)
    mid = budgets[len(budgets) // 2]
    rows = [("mid", mid), ("mid-topk", {**mid, "estimator": "topk", "num_samples": None}), ("low", budgets[0])]
    if causal:
        longer = 2 * default_segment(n, block_options(n).block)
        rows += [("mid-L2", {**mid, "causal_block": longer}), ("mid-mask", {**mid, "causal_layout": "mask"}),
                 ("low-mask", {**budgets[0], "causal_layout": "mask"})]
    return rows


def _options(options: dict, seed: int) -> dict:
    return {k: v for k, v in options.items() if v is not None} | {"seed": seed, "check_finite": False}


def _split_times(attn: KNNAttention, q, k, v, causal: bool, repeats: int) -> tuple[float, float]:
    """Median ms of the index (``route``) and of the attention (``routed_attention``) of one knn call."""
    nk, scale = k.shape[2], q.shape[-1] ** -0.5
    num = 0 if attn.estimator == "topk" else attn.num_samples or math.ceil(math.sqrt(nk))
    opts = block_options(nk, attn.index_options.nlist, attn.index_options.nprobe, attn.index_options.cell_size, num,
                         attn.causal_block, attn.causal_layout)
    gen = attn.generator(q.device)
    routing = route(q, k, causal, scale, opts, gen)
    route_t = time_callable(lambda: route(q, k, causal, scale, opts, gen), warmup=0, repeats=repeats, device=q.device)
    with torch.no_grad():
        attend_t = time_callable(lambda: routed_attention(q, k, v, causal, scale, routing), warmup=1,
                                 repeats=repeats, device=q.device)
    return 1e3 * route_t.median_s, 1e3 * attend_t.median_s


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if torch.device(device).type == "cuda" else None


def timing_rows(ns, *, heads: int, head_dim: int, dtype, device, repeats: int, error_rows: int, seed: int,
                deadline: float, on_row=None) -> list[dict]:
    """The timed rows (module docstring); a config that fails gets a row with its message; ``on_row(rows)`` after
    each row (the CSV is rewritten, so a run stopped from outside keeps what it measured)."""
    rows = []
    base = {"table": "timing", "input": "clustered", "dtype": str(dtype).removeprefix("torch."),
            "device": device_name(device)}
    for n in ns:
        x = make_input("clustered", n, InputSpec(heads=heads, head_dim=head_dim, seed=seed, dtype=dtype,
                                                   device=device, progress=False))
        rows_idx = sample_rows(n, error_rows, seed, device)
        for causal in (False, True):
            cell = {**base, "n": n, "causal": causal, "error_rows": rows_idx.numel()}
            if time.perf_counter() > deadline:
                rows.append({**cell, "config": "-", "status": "skipped", "message": "time budget spent"})
                continue
            reference = exact_rows(x.q, x.k, x.v, rows_idx, causal)
            exact = get_attention("exact")
            with torch.no_grad():
                exact_ms = 1e3 * time_callable(lambda: exact(x.q, x.k, x.v, causal=causal), warmup=1,
                                               repeats=repeats, device=device).median_s
            rows.append({**cell, "config": "exact", "options": {}, "status": "ok", "fwd_ms": exact_ms,
                         "exact_ms": exact_ms, "speedup": 1.0, "rel_fro": 0.0})
            for label, options in configs(n, causal):
                row = {**cell, "config": label, "options": options, "exact_ms": exact_ms}
                try:
                    _peak_reset(device)
                    attn = get_attention("knn", **_options(options, seed))
                    with torch.no_grad():
                        out = attn(x.q, x.k, x.v, causal=causal)
                        _sync(device)
                        rel = metrics.relative_frobenius_error(out[:, :, rows_idx].float(), reference)
                        del out
                        fwd_ms = 1e3 * time_callable(lambda: attn(x.q, x.k, x.v, causal=causal), warmup=0,
                                                     repeats=repeats, device=device).median_s
                        route_ms, attend_ms = _split_times(attn, x.q, x.k, x.v, causal, repeats)
                    rows.append({**row, "status": "ok", "fwd_ms": fwd_ms, "speedup": exact_ms / fwd_ms,
                                 "rel_fro": rel, "route_ms": route_ms, "attend_ms": attend_ms,
                                 "peak_mib": _peak_mib(device)})
                except Exception as err:  # noqa: BLE001 - a failed config is a row, the run goes on
                    rows.append({**row, "status": failure_status(err), "message": failure_message(err)})
                print(_line(rows[-1]), flush=True)
                if on_row is not None:
                    on_row(rows)
        del x
    return rows


def error_inputs(n: int, seed: int, device):
    """The three inputs of the error table (module docstring), float32, B = 1, H = 2, D = 64."""
    yield "clustered", synthetic_qkv("clustered", 1, 2, n, head_dim=64, seed=seed, device=device)
    yield "clustered_concentrated", synthetic_qkv("clustered", 1, 2, n, head_dim=64, seed=seed, device=device,
                                                  n_clusters=max(1, n // 64), sharpness=2.0)
    yield "gaussian", synthetic_qkv("gaussian", 1, 2, n, head_dim=64, seed=seed, device=device)


def error_rows_table(n: int, *, seed: int, device) -> list[dict]:
    """Relative Frobenius error of each config and of the exact top-k at the same budget, causal and not."""
    rows = []
    for name, x in error_inputs(n, seed, device):
        for causal in (False, True):
            ref = exact_rows(x.q, x.k, x.v, torch.arange(n, device=device), causal)
            results = {}
            for label, options in configs(n, causal):
                opts = block_options(n, options.get("nlist"), options.get("nprobe"), options.get("cell_size"))
                budget = min(n, opts.nprobe * opts.block)
                top = {"index": "torch", "k": budget, "estimator": "topk"}
                for config, config_options in ((label, options), (f"torch-top{budget}", top)):
                    if config not in results:
                        with torch.no_grad():
                            out = get_attention("knn", **_options(config_options, seed))(x.q, x.k, x.v, causal=causal)
                        results[config] = out
                        rows.append({"table": "error", "n": n, "causal": causal, "input": name, "dtype": "float32",
                                     "device": str(device), "config": config, "options": config_options,
                                     "status": "ok", "rel_fro": metrics.relative_frobenius_error(out, ref),
                                     "error_rows": n})
                        print(_line(rows[-1]), flush=True)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(r: dict) -> str:
    cells = [r["table"], r["n"], r["causal"], r["input"], r["config"], _fmt(r.get("fwd_ms"), ".2f"),
             _fmt(r.get("exact_ms"), ".2f"), _fmt(r.get("speedup"), ".2f"), _fmt(r.get("rel_fro"), ".3f"),
             _fmt(r.get("route_ms"), ".2f"), _fmt(r.get("attend_ms"), ".2f"), _fmt(r.get("peak_mib"), ".0f"),
             f"{r['status']} {r.get('message') or ''}".strip()]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write(rows: list[dict], out: Path) -> None:
    write_table(rows, out / "knn_gpu.csv", FIELDS)
    header = ("| table | n | causal | input | config | knn ms | exact ms | exact / knn | rel. Frobenius err "
              "| route ms | attend ms | peak MiB | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    (out / "knn_gpu.md").write_text(header + "\n".join(_line(r) for r in rows) + "\n")


def profile_table(n: int, *, heads: int, head_dim: int, dtype, device, seed: int) -> str:
    """torch.profiler tables (top kernels by device time) of one knn call at the ``mid`` budget, non-causal and
    causal, after a warm-up call; an error is reported in the text instead."""
    texts = []
    x = make_input("clustered", n, InputSpec(heads=heads, head_dim=head_dim, seed=seed, dtype=dtype, device=device,
                                               progress=False))
    attn = get_attention("knn", **_options(configs(n)[0][1], seed))
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    for causal in (False, True):
        try:
            with torch.no_grad():
                attn(x.q, x.k, x.v, causal=causal)
                _sync(device)
                with torch.profiler.profile(activities=activities) as prof:
                    attn(x.q, x.k, x.v, causal=causal)
                    _sync(device)
            events = prof.key_averages()
            key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
            try:
                table = events.table(sort_by=key, row_limit=30)
            except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
                table = events.table(sort_by="self_device_time_total", row_limit=30)
            calls = sum(e.count for e in events)
            texts.append(f"## n = {n}, causal = {causal}, {calls} profiled events\n{table}")
        except Exception as err:  # noqa: BLE001 - the profile is extra information, never a failure
            texts.append(f"## n = {n}, causal = {causal}: profile failed: {type(err).__name__}: {err}")
    return "\n\n".join(texts)


def run_cuda_tests(out: Path) -> int:
    """``pytest tests/knn_attention -k "cuda or gpu"``; its output goes to ``knn_gpu_pytest.txt``; returns its exit
    code."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rxXs", "tests/knn_attention", "-k",
                           "cuda or gpu"], capture_output=True, text=True)
    (out / "knn_gpu_pytest.txt").write_text(done.stdout + done.stderr)
    return done.returncode


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__.split("\n")[0], quick_help="n = 256, 512, 2 heads of dim 16, error n = 256")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="timed lengths (default 131072 262144)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (default 5, 2 --quick)")
    parser.add_argument("--error-rows", type=int, default=1024, help="sampled rows of the timed rows' error")
    parser.add_argument("--error-n", type=int, default=None, help="n of the error table (default 4096, 256 --quick)")
    parser.add_argument("--time-budget", type=float, default=100.0,
                        help="seconds for the timed rows (the rows not started by then are skipped)")
    parser.add_argument("--pytest", action=argparse.BooleanOptionalAction, default=None,
                        help="run pytest tests/knn_attention -k 'cuda or gpu' (default: on with a CUDA device)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="write knn_gpu_profile.txt: torch.profiler tables of one knn call at the largest n")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick
    ns = args.n or ([256, 512] if quick else [131072, 262144])
    heads, head_dim = (2, 16) if quick else (args.heads, args.head_dim)
    repeats = args.repeats or (2 if quick else 5)
    deadline = time.perf_counter() + args.time_budget
    rows = timing_rows(ns, heads=heads, head_dim=head_dim, dtype=DTYPES[args.dtype], device=device,
                       repeats=repeats, error_rows=args.error_rows, seed=args.seed, deadline=deadline,
                       on_row=lambda rows: write(rows, args.out))
    write(rows, args.out)
    rows += error_rows_table(args.error_n or (256 if quick else 4096), seed=args.seed, device=device)
    write(rows, args.out)
    if args.profile:
        (args.out / "knn_gpu_profile.txt").write_text(profile_table(
            ns[-1], heads=heads, head_dim=head_dim, dtype=DTYPES[args.dtype], device=device, seed=args.seed))
    if args.pytest if args.pytest is not None else device.type == "cuda":
        code = run_cuda_tests(args.out)
        print(f"pytest tests/knn_attention -k 'cuda or gpu': exit code {code} "
              f"(output in {args.out / 'knn_gpu_pytest.txt'})")
    print(f"wrote {args.out / 'knn_gpu.csv'} and {args.out / 'knn_gpu.md'} (torch {torch.__version__})")
    return rows


if __name__ == "__main__":
    main()
