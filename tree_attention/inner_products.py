"""Inner products per query vs the number l of visible keys: the reviewers' efficiency question, measured.

Exact attention reads every visible key: l inner products q . k for the query at position l - 1. The tree descent
(``tree.py``) spends one inner product q . sum_k per starting bud and one per expansion with two children (the
left child's comes by subtraction), so about T + P - 1 = ceil(l^e) + P - 1 per query, plus, for the random-feature
methods, as many inner products of R-dimensional features. This script counts them with the descent itself, on
synthetic queries/keys, for one query at each l of a geometric grid up to L, and plots the count against l beside
exact attention and T = ceil(l^e).

    python -m tree_attention.inner_products                   # L = 1024, P = 32 (the report's setting)
    python -m tree_attention.inner_products --quick           # L = 256
    python -m tree_attention.inner_products --expansions P    # the report's round rule: ..._P32_P.{png,csv}

The perplexity bench (``inference_bench.py``) records the same count on the nanoGPT model's real queries/keys.
"""
from __future__ import annotations

import csv

import torch

from common import plotting
from common.cli import script_parser
from common.data import synthetic_qkv

from .mass_estimators import METHODS, MassEstimator
from .np_attention import number_of_terms
from .tree import EXPANSION_RULES, PrefixSummaries, descend


def count_inner_products(method: str, L: int, P: int, e: float, positions: torch.Tensor, D: int = 64, H: int = 4,
                         batch: int = 4, data: str = "clustered", seed: int = 0,
                         expansions: str = "needed") -> torch.Tensor:
    """Inner products per query (batch, n) of the descent for queries at ``positions`` over L keys."""
    x = synthetic_qkv(data, batch, H, L, L, D, seed=seed, dtype=torch.float64)
    q = x.q[:, :, positions]
    est = MassEstimator(method, D, D ** -0.5, generator=torch.Generator().manual_seed(seed))
    summaries = PrefixSummaries(x.k, x.v, L, positions, est)
    _, inner = descend(summaries, est, q, positions, number_of_terms(positions + 1, e), L, P,
                       torch.Generator().manual_seed(seed + 1), expansions=expansions)
    return inner


def main(argv=None) -> list[dict]:
    parser = script_parser("Inner products per query of the tree descent vs l.",
                           quick_help="L = 256",
                           device_help="(the count runs on the CPU)")
    parser.add_argument("--L", type=int, default=1024, help="keys (a power of two)")
    parser.add_argument("--P", type=int, default=32, help="parallelism")
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--methods", nargs="+", default=["alignment", "uniform", "FAVOR+"],
                        choices=[m for m in METHODS if m != "tree-less"])
    parser.add_argument("--data", default="clustered", help="synthetic q/k kind (common.data.synthetic_qkv)")
    parser.add_argument("--expansions", default="needed", choices=EXPANSION_RULES,
                        help="round rule: 'needed' (T buds exactly) or 'P' (the report's P expansions per round)")
    args = parser.parse_args(argv)
    if args.quick:
        args.L = 256
    if args.L < 2 or args.L & (args.L - 1):
        raise SystemExit(f"--L must be a power of two >= 2, got {args.L}")
    ls = sorted({int(round(2 ** (i / 2))) for i in range(0, 2 * args.L.bit_length() - 1)} | {args.L})
    ls = [l for l in ls if l <= args.L]
    positions = torch.tensor(ls) - 1
    rows = []
    for method in args.methods:
        for e in args.exponents:
            inner = count_inner_products(method, args.L, args.P, e, positions, data=args.data, seed=args.seed,
                                         expansions=args.expansions)
            T = number_of_terms(positions + 1, e)
            rows += [dict(method=method, e=e, l=l, T=int(t), inner_products=float(c)) for l, t, c in
                     zip(ls, T, inner.double().mean(0))]
    print(f"inner products per query (mean over 4 sequences), L = {args.L}, P = {args.P}, {args.data} q/k, "
          f"expansions = {args.expansions}")
    shown = [l for l in ls if l & (l - 1) == 0]
    print("| method | e | " + " | ".join(f"l={l}" for l in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    print("| exact | - | " + " | ".join(str(l) for l in shown) + " |")
    for method in args.methods:
        for e in args.exponents:
            sel = {r["l"]: r["inner_products"] for r in rows if r["method"] == method and r["e"] == e}
            print(f"| {method} | {e} | " + " | ".join(f"{sel[l]:.1f}" for l in shown) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tree_inner_products_P{args.P}" + ("" if args.expansions == "needed" else f"_{args.expansions}")
    with (args.out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # one panel per method (their counts coincide, so lines of one plot would hide each other), one colour per e
    fig, axes = plotting.new_figure(ncols=len(args.methods), width=4.5, height=4.0)
    for ax, method in zip(axes[0], args.methods):
        ax.plot(ls, ls, "k--", label="exact attention (l)")
        for j, e in enumerate(args.exponents):
            sel = [r for r in rows if r["method"] == method and r["e"] == e]
            ax.plot([r["l"] for r in sel], [r["inner_products"] for r in sel], "o-", ms=3, color=f"C{j}",
                    label=f"e = {e}")
            ax.plot([r["l"] for r in sel], [r["T"] for r in sel], ":", color=f"C{j}", label=f"T = ceil(l^{e})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("visible keys l (count)")
        ax.set_ylabel("inner products per query (count)")
        ax.set_title(f"{method}: L = {args.L}, P = {args.P}, {args.data} q/k, expansions = {args.expansions!r}",
                     fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    print(f"wrote {plotting.save_figure(fig, args.out / f'{name}.png')}")
    return rows


if __name__ == "__main__":
    main()
