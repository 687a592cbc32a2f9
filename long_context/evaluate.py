"""One command: swap each attention method into the trained long-context models and report the end-to-end metric
(recall accuracy, LM perplexity) beside the attention's time, at 3 budgets per method and several n.

    python -m long_context.evaluate --quick                                   # CPU, seconds: both models, small n
    python -m long_context.evaluate --model recall --n 1024 4096 --methods knn kdeformer --layers first:1
    python -m long_context.evaluate --model lm --n 4096 --sweep first last --device cuda --dtype bfloat16 \\
        --time-budget 240 --out $OUT/long_context

Writes ``long_context_eval.csv`` under ``--out`` (rewritten after every row) and prints a markdown table; the
figures are drawn from the CSV by ``python -m long_context.plot``. A checkpoint trained with a method is also
evaluated with that method and its training options (budget ``trained``), beside exact. See :mod:`long_context.evaluation`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import common
from common.cli import script_parser
from nanoGPT.checkpoint import CheckpointError

from .checkpoints import DEFAULT_CHECKPOINTS, load_model
from .evaluation import BUDGET_LABELS, evaluate_model, markdown_table, trained_attention

ASSETS = common.plotting.ASSETS / "long_context"
CSV_NAME = "long_context_eval.csv"
QUICK = {"recall": dict(ns=[128, 512], batches=1, batch_size=4), "lm": dict(ns=[256], batches=1, batch_size=2)}


def parse_args(argv=None):
    parser = script_parser(__doc__.splitlines()[0], quick_help="small n, one batch, both models (CPU, seconds)",
                           out_help="folder for long_context_eval.csv")
    parser.set_defaults(out=ASSETS)
    parser.add_argument("--model", nargs="+", choices=("recall", "lm"),
                        help="models to evaluate (default: each whose checkpoint exists)")
    parser.add_argument("--recall-checkpoint", type=Path, nargs="+", default=[DEFAULT_CHECKPOINTS["recall"]],
                        help="recall checkpoint(s), each evaluated in turn (the CSV's checkpoint column)")
    parser.add_argument("--lm-checkpoint", type=Path, nargs="+", default=[DEFAULT_CHECKPOINTS["lm"]],
                        help="LM checkpoint(s), each evaluated in turn")
    parser.add_argument("--n", type=int, nargs="+", help="sequence lengths (default: recall 1024 4096, lm 1024)")
    parser.add_argument("--lm-n", type=int, nargs="+", help="the LM's lengths when they differ from --n")
    parser.add_argument("--methods", nargs="+",
                        help="causal methods (default: every one; 'exact' is always run; --methods exact: exact "
                             "with the --extra sets and a method-trained checkpoint's own method only)")
    parser.add_argument("--budgets", nargs="+", choices=BUDGET_LABELS, default=list(BUDGET_LABELS))
    parser.add_argument("--layers", default="all", help="layers patched: all, first:k, last:k or indices '0,2'")
    parser.add_argument("--sweep", nargs="*", choices=("first", "last"), default=[],
                        help="also patch the first / last k layers, k = 1 .. L-1, at --sweep-budget")
    parser.add_argument("--sweep-budget", choices=BUDGET_LABELS, default="mid")
    parser.add_argument("--extra", nargs=2, action="append", default=[], metavar=("METHOD", "JSON"),
                        help="an option set beyond the declared budgets, e.g. --extra knn '{\"index\": \"torch\", "
                             "\"k\": 256}' (repeatable; budget label 'extra'; seeded like the budgets)")
    parser.add_argument("--sweep-n", type=int, help="the n of the layer sweep (default: the largest n)")
    parser.add_argument("--batches", type=int, default=4, help="batches per row (the same for every method)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: autocast, the methods get bf16 q/k/v (for GPUs)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds for the whole run; rows not started by then are recorded as skipped (0: none)")
    parser.add_argument("--row-time-limit", type=float, default=0.0, help="seconds per row, else a timeout row")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        extra = tuple((name, json.loads(options)) for name, options in args.extra)
    except json.JSONDecodeError as err:
        raise SystemExit(f"long_context.evaluate: --extra options must be a JSON object ({err})") from None
    start = time.perf_counter()
    deadline = start + args.time_budget if args.time_budget > 0 else None
    csv_path = Path(args.out) / CSV_NAME
    rows: list[dict] = []
    paths = {"recall": args.recall_checkpoint, "lm": args.lm_checkpoint}
    kinds = args.model or [kind for kind, files in paths.items() if all(Path(f).is_file() for f in files)]
    for kind in set(paths) - set(kinds) if args.model is None else ():
        print(f"no {kind} checkpoint at {paths[kind]}: not evaluated (train it: see long_context/README.md)")
    for kind, path in ((kind, path) for kind in kinds for path in paths[kind]):
        try:
            model, info = load_model(path, kind, args.device)
        except CheckpointError as err:
            raise SystemExit(f"long_context.evaluate: {err}") from None
        quick = QUICK[kind] if args.quick else {}
        ns = (args.lm_n if kind == "lm" and args.lm_n else args.n) or quick.get("ns") or \
            ([1024, 4096] if kind == "recall" else [1024])
        if kind == "lm":
            ns = [min(n, model.config.block_size) for n in ns]
            ns = sorted(set(ns), key=ns.index)
        evaluate_model(model, kind, info["task"], ns, args.methods, budgets=args.budgets, layers=args.layers,
                       sweep=tuple(args.sweep), sweep_n=args.sweep_n, sweep_budget=args.sweep_budget, extra=extra,
                       batches=quick.get("batches", args.batches), batch_size=quick.get("batch_size", args.batch_size),
                       trained=trained_attention(model), checkpoint=Path(path).name,
                       seed=args.seed, dtype=args.dtype, row_time_limit=args.row_time_limit, deadline=deadline,
                       rows=rows, csv_path=csv_path,
                       progress=lambda r: print(f"{r['model']} n={r['n']} {r['method']} {r['budget']} {r['layers']}: "
                                                f"{r['status']} {r.get('metric', '')}", flush=True))
    print(markdown_table(rows))
    print(f"wrote {csv_path} ({len(rows)} rows) in {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
