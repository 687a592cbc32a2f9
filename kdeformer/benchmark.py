"""Speed and error of KDEformer against exact attention at one long sequence (issue goal: n = 16,384).

The inputs are those of ``demo_glove`` (GloVe with ``--glove PATH``, else the labelled stand-in: nanoGPT
Shakespeare keys/values, q = k = 10^(-1/4) x, scale 1). For each dtype and each (bucket_size, sample_size) the
script runs ``repeats`` rounds; every round times exact attention and each configuration once, in turn on the
same input (so load from other processes hits all of them alike), each configuration with a fresh seed. Reported:
median time, speed-up = median exact time / median time (same run), and the relative spectral error of the
output (mean over the batch and the rounds, i.e. over seeds). ``--causal`` measures causal attention against exact
causal attention. ``--profile`` also prints where KDEformer's (non-causal) time goes, by the stages that
``kdeformer.kde_blocks`` labels for ``torch.profiler``. The work is done by :mod:`kdeformer.experiments`.

    python -m kdeformer.benchmark --quick
    flock /tmp/bench.lock python -m kdeformer.benchmark --profile          # n = 16384, float32 and float64
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from common.cli import script_parser

from .experiments import SPEED_COLUMNS, load_inputs, machine_label, plot_speed, speed_rows, stage_profile


def parse_config(text: str) -> tuple[int, int]:
    """'256:1024' -> (bucket_size, sample_size)."""
    try:
        bucket, samples = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--configs: expected BUCKET:SAMPLES like 256:1024, got {text!r}")
    return bucket, samples


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
    parser.add_argument("--causal", action="store_true", help="causal attention (against exact causal)")
    parser.add_argument("--profile", action="store_true", help="print a stage breakdown of the first config")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch, args.repeats, args.standin = 2048, 1, 2, "clustered"
        args.configs = [(64, 128), (128, 256)]
    q, k, v, source = load_inputs(args.glove, args.n, args.batch, args.seed, args.standin)
    rows, profiles = [], {}
    for dtype in args.dtypes:
        qd, kd, vd = (t.to(device=args.device, dtype=getattr(torch, dtype)) for t in (q, k, v))
        rows += speed_rows(qd, kd, vd, args.configs, args.num_bits, args.repeats, args.seed, causal=args.causal)
        if args.profile:
            profiles[dtype] = stage_profile(qd, kd, vd, args.configs[0], args.num_bits, args.seed)
    print(f"data: {source}; n = {args.n}, batch = {args.batch}, num_bits = {args.num_bits}, {args.repeats} rounds, "
          f"causal = {args.causal}, {args.device} (timings from a shared CPU: medians, speed-up against exact in "
          "the same run)")
    print("| dtype | method | bucket_size | sample_size | median time (s) | speed-up vs exact | rel. spectral error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['method']} | {r['bucket_size']} | {r['sample_size']} | {r['time_s']:.4f} | "
              f"{r['speedup']:.2f}x | {r['rel_spec_err']:.4f} ± {r['rel_spec_err_std']:.4f} |")
    for dtype, stages in profiles.items():
        print(f"\nwhere the time goes ({dtype}, bucket_size:sample_size = {args.configs[0][0]}:{args.configs[0][1]}, "
              "one profiled non-causal call):")
        for name, seconds in stages.items():
            print(f"  {name:32s} {seconds * 1e3:8.1f} ms  ({seconds / stages['total']:.0%})")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kdeformer_speed_causal" if args.causal else "kdeformer_speed"
    with (args.out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SPEED_COLUMNS)
        writer.writeheader()
        writer.writerows({"data": source, "n": args.n, "batch": args.batch, "num_bits": args.num_bits, **r}
                         for r in rows)
    print(f"wrote {plot_speed(rows, source, args.n, args.out / f'{stem}.png', machine_label(args.device))}")
    return rows


if __name__ == "__main__":
    main()
