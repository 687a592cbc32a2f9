"""KDEformer's GloVe experiment (Zandieh et al. 2023, Sec. 5.1, Fig. 3): error vs budget of four approximations.

Q = K = word vectors scaled by 10^(-1/4), V = other word vectors (the next n words), batch of 8 disjoint windows,
one head, attention scale 1, float64. For each budget num_feats f: Reformer (bucket_size f/2, 8 hashing rounds as
in the original demo; plus a 1-round row), Performer (f features), ScatterBrain (local f/2 + f features), KDEformer
(r = 7, bucket_size f/2, sample_size f). Reported: the mean over the batch of the relative spectral-norm error of
the output and the median time, printed as a table and drawn in ``assets/kdeformer_glove.png``.

Data: ``--glove PATH`` (GloVe text format, e.g. glove.6B.100d.txt, needs 2 n batch words). Without it (no GloVe
file ships with the repository) the script says so and uses a STAND-IN, labelled as such everywhere:
``--standin shakespeare`` (default): real key and value vectors of the last layer, head 0, of the small nanoGPT
model trained on tiny Shakespeare (``nanoGPT.qkv_source``; d = 32), or ``--standin clustered``: clustered synthetic
vectors (d = 100; what ``--quick`` uses, so that it needs no trained model). The work is done by
:mod:`kdeformer.experiments`.

    python -m kdeformer.demo_glove --quick
    python -m kdeformer.demo_glove --n 8192 --glove glove.6B.100d.txt
"""
from __future__ import annotations

import csv
from pathlib import Path

from common.cli import script_parser

from .experiments import GLOVE_COLUMNS, glove_rows, load_inputs, machine_label, plot_glove


def main(argv=None) -> list[dict]:
    parser = script_parser("KDEformer's GloVe experiment (error vs budget and time).",
                           quick_help="n = 256, batch 2, budgets 16 and 64, clustered stand-in, one run")
    parser.add_argument("--glove", type=Path, default=None, help="GloVe-format text file")
    parser.add_argument("--standin", choices=["shakespeare", "clustered"], default="shakespeare",
                        help="data when no --glove is given (--quick uses clustered)")
    parser.add_argument("--n", type=int, default=8192, help="sequence length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch, args.budgets, args.repeats, args.standin = 256, 2, [16, 64], 1, "clustered"
    q, k, v, source = load_inputs(args.glove, args.n, args.batch, args.seed, args.standin)
    q, k, v = (t.to(args.device) for t in (q, k, v))
    rows = glove_rows(q, k, v, args.budgets, args.repeats, args.seed)
    print(f"data: {source}; n = {args.n}, batch = {args.batch}, float64, {args.device} (shared CPU: times are medians "
          f"of {args.repeats} runs, ratio against exact in the same run)")
    print("| method | num_feats | rel. spectral error | time (s) | time / exact |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['num_feats']} | {r['rel_spec_err']:.4f} | {r['time_s']:.4f} | {r['ratio_to_exact']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kdeformer_glove.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GLOVE_COLUMNS)
        writer.writeheader()
        writer.writerows({"data": source, "n": args.n, "batch": args.batch, **r} for r in rows)
    print(f"wrote {plot_glove(rows, source, args.n, args.out / 'kdeformer_glove.png', machine_label(args.device))}")
    return rows


if __name__ == "__main__":
    main()
