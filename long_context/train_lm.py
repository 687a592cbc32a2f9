"""Train the long-context character LM on tiny Shakespeare (learned positions, block 4096 by default) with exact
attention or a trainable method through ``nanoGPT.train`` (resumable checkpoints in ``--work-dir``), then write it as a small long-context
checkpoint (weights in float16, manifest beside it).

    python -m long_context.train_lm --quick                                         # CPU smoke run, seconds
    python -m long_context.train_lm --device cuda --dtype bfloat16 --out $OUT/long_context/lm_exact.pth
    python -m long_context.train_lm --block-size 8192 --max-iters 3000 ...          # any nanoGPT.train key:
    python -m long_context.train_lm --set n_layer=6 --set batch_size=4              #   --set key=value
    python -m long_context.train_lm --attention srf --attention-budget mid ...      # trained with a method
    python -m long_context.train_lm --attention knn --attention-options '{"index": "ivf_blocks", "nprobe": 8}'

``--attention NAME`` trains with that method in every layer (from scratch, as the kNN and SRF papers trained),
with the options of ``--attention-budget low|mid|high`` (its declared budget at the block size) updated by
``--attention-options JSON``; the checkpoint's config and manifest (``trained_attention``) record them.

Defaults (``long_context.training.LM_DEFAULTS``): 4 layers, 4 heads, 128 dims, block 4096, batch 8, 2000 steps,
lr 2e-3 with 100 warm-up steps and cosine decay to 1e-4. See :mod:`long_context.training`.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from common.cli import script_parser
from nanoGPT.configurator import load_config
from nanoGPT.train import TrainConfig

from .checkpoints import LM_CHECKPOINT
from .training import LM_DEFAULTS, add_attention_arguments, attention_from_args, export_lm, train_lm

QUICK = dict(block_size=128, n_layer=2, n_head=2, n_embd=32, batch_size=2, max_iters=4, eval_interval=2,
             eval_iters=1, warmup_iters=1)


def parse_args(argv=None):
    parser = script_parser(__doc__.splitlines()[0], quick_help="4 steps of a tiny model at block 128 (a smoke run)",
                           with_out=False)
    parser.add_argument("--out", type=Path, default=LM_CHECKPOINT, help="the checkpoint file to write")
    parser.add_argument("--work-dir", type=Path, default=Path("long_context/out/lm"),
                        help="nanoGPT.train's out_dir (its full, resumable checkpoint and loss curve)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--block-size", type=int, default=None, help=f"default {LM_DEFAULTS['block_size']}")
    parser.add_argument("--max-iters", type=int, default=None, help=f"default {LM_DEFAULTS['max_iters']}")
    parser.add_argument("--resume", action="store_true", help="continue the run in --work-dir")
    parser.add_argument("--fit-time", type=float, default=0.0, metavar="SECONDS",
                        help="lower --max-iters to the steps that fit this many seconds (timed by two short probe "
                             "runs first), so that the learning-rate schedule ends within a time limit")
    parser.add_argument("--export-only", action="store_true",
                        help="train nothing: write the model of --work-dir's checkpoint (e.g. a run stopped by a "
                             "time limit) to --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other nanoGPT.train config key (repeatable)")
    parser.add_argument("--threads", type=int, default=0)
    add_attention_arguments(parser, "the block size")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    values = {**LM_DEFAULTS, **(QUICK if args.quick else {})}
    if args.block_size is not None:
        values["block_size"] = args.block_size
    if args.max_iters is not None:
        values["max_iters"] = args.max_iters
    options = attention_from_args(args, values["block_size"], "long_context.train_lm")
    overrides = [f"--{k}={v!r}" for k, v in values.items()] + [f"--{kv}" for kv in args.set]
    overrides += [f"--out_dir={args.work_dir}", f"--device={args.device}", f"--dtype={args.dtype}",
                  f"--seed={args.seed}", f"--threads={args.threads}", f"--attention={args.attention}",
                  f"--attention_options={options!r}",
                  "--init_from=resume" if args.resume else "--overwrite=True"]
    cfg = load_config(TrainConfig, overrides)
    command = "python -m long_context.train_lm " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    model = export_lm(args.work_dir, args.out, command) if args.export_only else \
        train_lm(cfg, args.out, command, fit_time=0.0 if args.resume else args.fit_time)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
