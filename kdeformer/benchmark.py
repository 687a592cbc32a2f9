"""Speed and error of KDEformer against exact attention at one long sequence (issue goal: n = 16,384).

The inputs are those of ``demo_glove`` (GloVe with ``--glove PATH``, else the labelled stand-in: nanoGPT
Shakespeare keys/values, q = k = 10^(-1/4) x, scale 1). For each dtype and each (bucket_size, sample_size) the
script runs ``repeats`` rounds; every round times exact attention and each configuration once, in turn on the
same input (so load from other processes hits all of them alike), each configuration with a fresh seed. Reported:
median time, speed-up = median exact time / median time (same run), and the relative spectral error of the
output (mean over the batch and the rounds, i.e. over seeds). ``--profile`` also prints where KDEformer's time
goes, by the stages that ``kdeformer.kde_blocks`` labels for ``torch.profiler``.

    python -m kdeformer.benchmark --quick
    flock /tmp/bench.lock python -m kdeformer.benchmark --profile          # n = 16384, float32 and float64
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from common import get_attention, plotting
from common.bench import time_callable
from common.cli import script_parser
from common.metrics import relative_spectral_error

from .demo_glove import load_inputs

STAGES = ("kdeformer.lsh_sort", "kdeformer.residual_sample", "kdeformer.gather", "kdeformer.block_attention",
          "kdeformer.unsort")


def parse_config(text: str) -> tuple[int, int]:
    """'256:1024' -> (bucket_size, sample_size)."""
    try:
        bucket, samples = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--configs: expected BUCKET:SAMPLES like 256:1024, got {text!r}")
    return bucket, samples


def timed_call(fn, device):
    """(seconds, output) of one call of ``fn``."""
    result = {}
    seconds = time_callable(lambda: result.update(out=fn()), warmup=0, repeats=1, device=device).median_s
    return seconds, result["out"]


def measure(q, k, v, configs, num_bits: int, repeats: int, seed: int, progress: bool = True) -> list[dict]:
    """Rows (one per configuration, exact first) of interleaved timings and errors on one input."""
    exact = get_attention("exact")
    methods = {cfg: get_attention("kdeformer", num_bits=num_bits, bucket_size=cfg[0], sample_size=cfg[1],
                                  seed=seed) for cfg in configs}
    times = {cfg: [] for cfg in ["exact", *configs]}
    errors = {cfg: [] for cfg in configs}
    with torch.no_grad():
        reference = exact(q, k, v, scale=1.0)
        for attn in methods.values():  # warm-up (first-call allocations)
            attn(q, k, v, scale=1.0)
        for r in tqdm(range(repeats), desc=f"rounds ({q.dtype})", disable=not progress):
            times["exact"].append(timed_call(lambda: exact(q, k, v, scale=1.0), q.device)[0])
            for cfg, attn in methods.items():
                attn.reseed(seed + 1 + r)
                seconds, out = timed_call(lambda: attn(q, k, v, scale=1.0), q.device)
                times[cfg].append(seconds)
                errors[cfg].append(statistics.fmean(relative_spectral_error(out[b], reference[b])
                                                    for b in range(q.shape[0])))
    t_exact = statistics.median(times["exact"])
    rows = [dict(dtype=str(q.dtype).removeprefix("torch."), method="exact", bucket_size="", sample_size="",
                 time_s=t_exact, speedup=1.0, rel_spec_err=0.0, rel_spec_err_std=0.0)]
    for cfg in configs:
        t = statistics.median(times[cfg])
        rows.append(dict(dtype=rows[0]["dtype"], method="kdeformer", bucket_size=cfg[0], sample_size=cfg[1],
                         time_s=t, speedup=t_exact / t, rel_spec_err=statistics.fmean(errors[cfg]),
                         rel_spec_err_std=statistics.pstdev(errors[cfg])))
    return rows


def stage_profile(q, k, v, config, num_bits: int, seed: int) -> dict[str, float]:
    """Seconds per labelled stage of one KDEformer call (torch.profiler), plus 'total' and 'other'."""
    attn = get_attention("kdeformer", num_bits=num_bits, bucket_size=config[0], sample_size=config[1], seed=seed)
    with torch.no_grad():
        attn(q, k, v, scale=1.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total, _ = timed_call(lambda: attn(q, k, v, scale=1.0), q.device)
    stages = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in STAGES}
    stages = {name: stages.get(name, 0.0) for name in STAGES}
    stages["other (validation, bias, ...)"] = total - sum(stages.values())
    stages["total"] = total
    return stages


def plot(rows: list[dict], source: str, n: int, path: Path) -> Path:
    fig, axes = plotting.new_figure(width=6.0, height=4.4)
    ax = axes[0][0]
    right = 1.1 * max(r["speedup"] for r in rows)
    ax.fill_between([5, max(right, 6.0)], 0, 0.10, color="green", alpha=0.08, label="goal: >= 5x faster, error < 10%")
    for dtype, marker, offset in (("float32", "o", (5, 4)), ("float64", "s", (5, -10))):
        sel = [r for r in rows if r["dtype"] == dtype and r["method"] == "kdeformer"]
        if not sel:
            continue
        ax.errorbar([r["speedup"] for r in sel], [r["rel_spec_err"] for r in sel],
                    yerr=[r["rel_spec_err_std"] for r in sel], fmt=marker, capsize=2,
                    color=plotting.method_color("kdeformer"), mfc="white" if dtype == "float64" else None,
                    label=f"kdeformer, {dtype} (± std over seeds)")
        for r in sel:
            ax.annotate(f"{r['bucket_size']}:{r['sample_size']}", (r["speedup"], r["rel_spec_err"]),
                        textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("speed-up over exact attention (x, median time, same run)")
    ax.set_ylabel("relative spectral error of output")
    ax.set_title(f"{source}\nn = {n}, shared 2-core CPU; labels bucket_size:sample_size", fontsize=9)
    ax.legend(loc="upper left")
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser("KDEformer speed-up and error vs exact attention at one n.",
                           quick_help="n = 2048, batch 1, clustered stand-in, 2 rounds")
    parser.add_argument("--glove", type=Path, default=None, help="GloVe-format text file (else a labelled stand-in)")
    parser.add_argument("--standin", choices=["shakespeare", "clustered"], default="shakespeare")
    parser.add_argument("--n", type=int, default=16384, help="sequence length")
    parser.add_argument("--batch", type=int, default=4, help="batch (the Shakespeare stand-in holds 6 x 16384)")
    parser.add_argument("--configs", type=parse_config, nargs="+",
                        default=[(256, 512), (256, 1024), (512, 1024), (256, 2048), (512, 2048)],
                        help="BUCKET:SAMPLES pairs")
    parser.add_argument("--num-bits", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (seeds) per configuration")
    parser.add_argument("--profile", action="store_true", help="print a stage breakdown of the first config")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch, args.repeats, args.standin = 2048, 1, 2, "clustered"
        args.configs = [(64, 128), (128, 256)]
    q, k, v, source = load_inputs(args.glove, args.n, args.batch, args.seed, args.standin)
    rows, profiles = [], {}
    for dtype in args.dtypes:
        qd, kd, vd = (t.to(device=args.device, dtype=getattr(torch, dtype)) for t in (q, k, v))
        rows += measure(qd, kd, vd, args.configs, args.num_bits, args.repeats, args.seed)
        if args.profile:
            profiles[dtype] = stage_profile(qd, kd, vd, args.configs[0], args.num_bits, args.seed)
    print(f"data: {source}; n = {args.n}, batch = {args.batch}, num_bits = {args.num_bits}, {args.repeats} rounds, "
          f"{args.device} (timings from a shared CPU: medians, speed-up against exact in the same run)")
    print("| dtype | method | bucket_size | sample_size | median time (s) | speed-up vs exact | rel. spectral error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['method']} | {r['bucket_size']} | {r['sample_size']} | {r['time_s']:.4f} | "
              f"{r['speedup']:.2f}x | {r['rel_spec_err']:.4f} ± {r['rel_spec_err_std']:.4f} |")
    for dtype, stages in profiles.items():
        print(f"\nwhere the time goes ({dtype}, bucket_size:sample_size = {args.configs[0][0]}:{args.configs[0][1]}, "
              "one profiled call):")
        for name, seconds in stages.items():
            print(f"  {name:32s} {seconds * 1e3:8.1f} ms  ({seconds / stages['total']:.0%})")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kdeformer_speed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["data", "n", "batch", "num_bits", *rows[0]])
        writer.writeheader()
        writer.writerows({"data": source, "n": args.n, "batch": args.batch, "num_bits": args.num_bits, **r}
                         for r in rows)
    print(f"wrote {plot(rows, source, args.n, args.out / 'kdeformer_speed.png')}")
    return rows


if __name__ == "__main__":
    main()
