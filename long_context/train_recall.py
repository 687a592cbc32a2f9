"""Train the recall model: a GPT without position embeddings (NoPE) on multi-query associative recall, with exact
attention or a trainable method, written as a long-context checkpoint (weights in float16, a manifest beside it).

    python -m long_context.train_recall --quick                   # CPU, seconds: a smoke run (does not learn)
    python -m long_context.train_recall                           # the committed checkpoint's run (CPU, minutes)
    python -m long_context.train_recall --device cuda --dtype bfloat16 --lengths 1024 4096 \\
        --init long_context/checkpoints/recall_exact.pth --max-iters 500 --out $OUT/long_context/recall_ft.pth

    python -m long_context.train_recall --device cuda --dtype bfloat16 --lengths 1024 4096 16384 \
        --init long_context/checkpoints/recall_exact.pth --attention knn --attention-budget mid \
        --attention-options '{"index": "ivf_blocks"}' --out $OUT/long_context/recall_long_knn.pth

``--init`` fine-tunes a trained checkpoint (e.g. at longer n on a GPU); its task and model are kept.
``--attention NAME`` trains with that method (any trainable causal one) in every layer, with the options of
``--attention-budget low|mid|high`` (its declared budget at the largest training length) updated by
``--attention-options JSON``; the checkpoint's config and manifest record them. The checkpoint is written after
every evaluation too, so a run killed from outside leaves its last one. See :mod:`long_context.training`.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from common.cli import script_parser

from .checkpoints import RECALL_CHECKPOINT, load_model
from .training import RecallTrainConfig, add_attention_arguments, attention_from_args, save_recall, train_recall

SCRIPT_FIELDS = ("seed", "device", "dtype", "attention", "attention_options")

QUICK = dict(lengths=(32, 64), max_iters=20, eval_interval=10, eval_batches=1, batch_size=8)


def parse_args(argv=None):
    parser = script_parser(__doc__.splitlines()[0], quick_help="20 steps at n = 32, 64 (a smoke run)",
                           with_out=False)
    parser.add_argument("--out", type=Path, default=RECALL_CHECKPOINT, help="the checkpoint file to write")
    parser.add_argument("--init", type=Path, help="fine-tune this recall checkpoint instead of starting anew")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    add_attention_arguments(parser, "the largest training length")
    parser.add_argument("--weights", choices=("float16", "float32"), default="float16",
                        help="the stored parameters' dtype")
    for f in dataclasses.fields(RecallTrainConfig):
        if f.name in SCRIPT_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=None, help=f"default {f.default}")
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=f"default {f.default}")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(QUICK) if args.quick else {}
    model, info = None, None
    if args.init is not None:
        model, info = load_model(args.init, "recall", args.device)
        task = info["task"]
        values.update(pairs=task.pairs, queries=task.queries, n_keys=task.n_keys, n_values=task.n_values,
                      n_distractors=task.n_distractors, n_layer=model.config.n_layer, n_head=model.config.n_head,
                      n_embd=model.config.n_embd, key_curriculum=())  # a fine-tune runs the full task
    for f in dataclasses.fields(RecallTrainConfig):
        given = getattr(args, f.name, None)
        if given is not None and f.name not in SCRIPT_FIELDS:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    lengths = values.get("lengths", RecallTrainConfig.lengths)
    options = attention_from_args(args, max(lengths), "long_context.train_recall")
    cfg = RecallTrainConfig(**values, attention=args.attention, attention_options=options, seed=args.seed,
                            device=args.device, dtype=args.dtype)
    command = "python -m long_context.train_recall " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    parent = info["manifest"] if args.init else None

    def save(model, history):
        if model.config.block_size != max(cfg.lengths):
            model.config.block_size = max(cfg.lengths)  # NoPE: the length it was (last) trained at, for the record
        return save_recall(args.out, model, cfg, history, command, parent=parent, half=args.weights == "float16")

    model, history = train_recall(cfg, model, on_evaluation=save)  # the last evaluation wrote the final model
    print(f"wrote {args.out}: {history[-1]}")
    return model, history


if __name__ == "__main__":
    main()
