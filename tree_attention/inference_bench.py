"""The perplexity experiment of the tree-attention report, on this repository's nanoGPT.

The report decodes WikiText-2 with pretrained GPT-2, each query attending through the tree to the prefix of its
1024-token block. Here: the small nanoGPT trained with exact attention on tiny Shakespeare
(``nanoGPT.quick_model``, trained on first use, or ``--out_dir`` of another checkpoint), every layer's attention
replaced by tree attention (causal, whole blocks at once, which equals token-by-token decoding because each query
only reads its prefix), on ``percentage_of_test_set`` % of the validation split starting at ``offset`` %.
The running perplexity after each batch of blocks is appended to
``<out>/perplexity_<method>_<e>_<pct>_<offset>_<bud_value>.txt`` (``--out``, default ``tree_attention/out``).
``--bud_value count`` (default; the README's tables' 'count' rows) weights each bud by its key count (exact at
e = 1); ``report`` combines the buds as the report does. The descent expands min(P, T - buds) buds per round
(``--expansions needed``, default, as in the README's tables) or P per round as the report's code does
(``--expansions P``). Each run also records the inner products per query that the descents spent (mean over
blocks and layers), by position.

    python -m tree_attention.inference_bench alignment 0.5 5 0
    python -m tree_attention.inference_bench --table --seeds 3 alignment 0.5 4 0
        # every method x e in 0.2..0.9 x both bud values x 3 seeds, beside exact, on 4 % of the split from 0 %
        # (in --table mode the method and e positionals are not used); assets/tree_perplexity.{csv,png}
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from statistics import mean, stdev

import torch
from tqdm import tqdm

from common import plotting

from .mass_estimators import METHODS
from .np_attention import BUD_VALUES
from .tree import EXPANSION_RULES

LOG_DIR = Path(__file__).resolve().parent / "out"  # a single run's running-perplexity log, unless --out


def validation_blocks(pct: float, offset: float, block_size: int) -> torch.Tensor:
    """Consecutive validation blocks (n, block_size + 1) covering pct % of the split from offset %."""
    from nanoGPT.data_loader import load_split

    if not 0 < pct <= 100 or not 0 <= offset < 100:
        raise ValueError(f"inference_bench: need 0 < percentage_of_test_set <= 100 and 0 <= offset < 100, "
                         f"got {pct}, {offset}")
    data = torch.as_tensor(load_split("val").astype("int64"))
    start = int(len(data) * offset / 100)
    stop = min(len(data), start + int(len(data) * pct / 100))
    n = (stop - start - 1) // block_size
    if n < 1:
        raise ValueError(f"inference_bench: {pct}% from {offset}% holds less than one block of {block_size} tokens")
    idx = start + torch.arange(n).unsqueeze(1) * block_size + torch.arange(block_size + 1)
    return data[idx]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, log_path: Path | None = None, batch: int = 16) -> float:
    """exp(mean cross-entropy) over all blocks; the running value is appended to ``log_path`` per batch."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(blocks), batch):
        chunk = blocks[i:i + batch]
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk.shape[0]
        count += chunk.shape[0]
        if log_path is not None:
            with log_path.open("a") as f:
                f.write(f"{count} {math.exp(total / count):.6f}\n")
    return math.exp(total / count)


def inner_products_by_position(model) -> torch.Tensor:
    """Inner products per query of the last forward pass, (block_size,), mean over its blocks and the layers."""
    counts = [block.attn.attention.last_inner_products.double().mean(0) for block in model.blocks]
    return torch.stack(counts).mean(0)


def run_one(model, method: str, e: float, pct: float, offset: float, seed: int = 0, bud_value: str = "count",
            log_dir: Path | None = None, batch: int = 16, expansions: str = "needed") -> tuple[float, torch.Tensor]:
    """Perplexity and inner products per query by position (for exact: l, every key); the running perplexity is
    appended to a file in ``log_dir`` (module docstring) unless it is None."""
    blocks = validation_blocks(pct, offset, model.config.block_size)
    if method == "exact":
        model.set_attention("exact")
    else:
        model.set_attention("tree", method=method, number_of_terms_exponent=e, seed=seed, bud_value=bud_value,
                            expansions=expansions)
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"perplexity_{method}_{e}_{pct}_{offset}_{bud_value}.txt"
    ppl = perplexity(model, blocks, log_path, batch=batch)
    if method == "exact":
        return ppl, torch.arange(1, model.config.block_size + 1, dtype=torch.float64)
    return ppl, inner_products_by_position(model)


POSITIONS_SHOWN = (8, 16, 32, 64)  # l at which the table shows inner products per query


def main(argv=None):
    parser = argparse.ArgumentParser(description="Perplexity of nanoGPT with its attention replaced by tree attention.")
    parser.add_argument("attention_method", nargs="?", default="alignment", choices=[*METHODS, "exact"])
    parser.add_argument("number_of_terms_exponent", nargs="?", type=float, default=0.5)
    parser.add_argument("percentage_of_test_set", nargs="?", type=float, default=5.0)
    parser.add_argument("offset", nargs="?", type=float, default=0.0)
    parser.add_argument("--bud_value", default="count", choices=BUD_VALUES, help="bud combination (single run)")
    parser.add_argument("--expansions", default="needed", choices=EXPANSION_RULES,
                        help="round rule: 'needed' (T buds exactly) or 'P' (the report's P expansions per round)")
    parser.add_argument("--out_dir", default=None, help="nanoGPT checkpoint folder (default: the quick model)")
    parser.add_argument("--table", action="store_true",
                        help="every method x e x bud value x seed, beside exact (on the positional pct / offset)")
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--bud_values", nargs="+", default=list(BUD_VALUES), choices=BUD_VALUES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="--table's methods")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1%% of the split, e in {0.3, 0.6}, 2 methods, 2 seeds")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder of a single run's log (default {LOG_DIR}) or of --table's CSV and figure "
                             f"(default {plotting.ASSETS})")
    args = parser.parse_intermixed_args(argv)  # positionals may follow the options
    if args.out_dir:
        from nanoGPT.checkpoint import load_model
        model, _ = load_model(args.out_dir, device=args.device)
    else:
        from nanoGPT.quick_model import get_quick_model
        model, _ = get_quick_model(device=args.device)
    if not args.table:
        ppl, inner = run_one(model, args.attention_method, args.number_of_terms_exponent, args.percentage_of_test_set,
                             args.offset, args.seed, args.bud_value, args.out or LOG_DIR, expansions=args.expansions)
        print(f"{args.attention_method} e={args.number_of_terms_exponent} bud_value={args.bud_value} "
              f"expansions={args.expansions}: perplexity "
              f"{ppl:.4f}; inner products per query {inner.mean():.2f} on average (exact: "
              f"{(model.config.block_size + 1) / 2:.1f}), {inner[-1]:.2f} at l = {model.config.block_size}")
        return ppl
    out = args.out or plotting.ASSETS
    methods, exponents, pct, bud_values = args.methods, args.exponents, args.percentage_of_test_set, args.bud_values
    if args.quick:
        methods, exponents, pct, args.seeds = ["alignment", "uniform"], [0.3, 0.6], 1.0, 2
    n_blocks = len(validation_blocks(pct, args.offset, model.config.block_size))

    def row(method, bud_value, e, results):
        ppls = [r[0] for r in results]
        inner = torch.stack([r[1] for r in results]).mean(0)
        out = dict(method=method, bud_value=bud_value, expansions=args.expansions, e=e, seeds=len(ppls), ppl_mean=mean(ppls),
                   ppl_std=stdev(ppls) if len(ppls) > 1 else 0.0, inner_products_mean=inner.mean().item())
        out.update({f"inner_products_l{l}": inner[l - 1].item() for l in POSITIONS_SHOWN if l <= len(inner)})
        return out

    # exact attention is deterministic: one run is its value for every seed
    rows = [row("exact", "-", 1.0, [run_one(model, "exact", 1.0, pct, args.offset, batch=n_blocks)])]
    for bud_value in bud_values:
        for method in tqdm(methods, desc=f"methods ({bud_value})"):
            for e in exponents:
                results = [run_one(model, method, e, pct, args.offset, seed, bud_value, batch=n_blocks,
                                   expansions=args.expansions) for seed in range(args.seed, args.seed + args.seeds)]
                rows.append(row(method, bud_value, e, results))
    print(f"validation perplexity, {pct}% of the split from {args.offset}% ({n_blocks} blocks of "
          f"{model.config.block_size}), seeds {args.seed}..{args.seed + args.seeds - 1}, expansions={args.expansions}")
    print("| method | bud_value | e | perplexity (mean ± std over seeds) | inner products / query (mean) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bud_value']} | {r['e']} | {r['ppl_mean']:.3f} ± {r['ppl_std']:.3f} | "
              f"{r['inner_products_mean']:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tree_perplexity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    exact = rows[0]["ppl_mean"]
    fig, axes = plotting.new_figure(ncols=len(bud_values), width=5.5, height=4.2)
    for ax, bud_value in zip(axes[0], bud_values):
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["bud_value"] == bud_value]
            ax.errorbar([r["e"] for r in sel], [r["ppl_mean"] for r in sel], yerr=[r["ppl_std"] for r in sel],
                        marker="o", ms=3, capsize=3, label=method)
        ax.axhline(exact, color="black", ls="--", label="exact attention")
        ax.set_xlabel("number_of_terms_exponent e (T = ceil(l^e) buds)")
        ax.set_ylabel("validation perplexity (per character)")
        ax.set_title(f"bud_value = {bud_value!r}, {pct}% of val, {args.seeds} seeds", fontsize=9)
        ax.legend(fontsize=6)
    print(f"wrote {plotting.save_figure(fig, out / 'tree_perplexity.png')}")
    return rows


if __name__ == "__main__":
    main()
