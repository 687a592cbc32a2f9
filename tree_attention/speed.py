"""Speed of tree attention against exact attention (SDPA) in the same dtype, with its cost and error beside it.

For each sequence length n: causal forward of ``tree`` (B = 1, H = 8, D = 64, clustered synthetic q/k/v, the
descent and everything else on ``--device``) and of exact attention through
``torch.nn.functional.scaled_dot_product_attention`` in the same dtype, medians of ``--repeats`` timed runs after
one warm-up (``common.bench.time_callable``, CUDA-synchronised), both with ``check_finite=False`` (no host read of
the inputs or output: tree's default path then reads nothing back from a GPU). ``--early_exit`` times the descent's
modes: ``off`` (the bound's rounds, no host read: the default off the CPU), ``on`` (stop once no query needs a
round: one host read per round, a synchronisation on CUDA; the default on the CPU), ``auto`` (the default of the
device). Beside the time: the round bound of the last query block (``tree.round_bound``), the inner products
q . sum per query that the descent spent (mean over queries, and at the last query, against n for exact
attention; the count ``tree.py`` defines) and the error rms(tree - exact) / rms(v) on the same input. One CSV row
per (n, e, mode): ``<out>/tree_speed_<device>_<dtype>.csv``.

    python -m tree_attention.speed --quick                                   # n = 256, 512 on the CPU
    python -m tree_attention.speed --device cuda --dtype bfloat16 --n 16384 131072 --early_exit on off
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.attention import ExactAttention
from common.bench import time_callable
from common.cli import script_parser, write_table
from common.data import synthetic_qkv

from .mass_estimators import METHODS
from .np_attention import TreeAttention, number_of_terms
from .tree import resolve_early_exit, round_bound

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
EARLY_EXIT = {"auto": None, "on": True, "off": False}
FIELDS = ["n", "dtype", "device", "method", "e", "P", "early_exit", "rounds_bound", "tree_ms", "exact_ms", "ratio",
          "inner_products_mean", "inner_products_last", "exact_inner_products_mean", "rel_rms_error", "output_device"]


def measure(n: int, dtype: torch.dtype, device, method: str = "alignment", e: float = 0.5, P: int = 16,
            query_block: int | None = None, repeats: int = 3, heads: int = 8, head_dim: int = 64, seed: int = 0,
            modes=("auto",)) -> list[dict]:
    """One row per early-exit mode (``EARLY_EXIT``): times (ms) of tree and exact, their ratio, inner products per
    query, error vs exact; exact is timed once per call."""
    x = synthetic_qkv("clustered", 1, heads, n, n, head_dim, seed=seed, dtype=dtype, device=device)
    exact = ExactAttention(check_finite=False)
    L = 1 << max(0, math.ceil(math.log2(n)))
    last = np.arange(max(0, n - 4096), n)  # the last queries: their block has the most rounds
    bound = int(round_bound(last, number_of_terms(last + 1, e), L, min(P, L)).max())
    rows = []
    with torch.no_grad():
        t_exact = time_callable(lambda: exact(x.q, x.k, x.v, causal=True), repeats=repeats, device=device)
        ref = exact(x.q, x.k, x.v, causal=True)
        for mode in modes:
            tree = TreeAttention(method=method, number_of_terms_exponent=e, parallelism=P, query_block=query_block,
                                 seed=seed, early_exit=EARLY_EXIT[mode], check_finite=False)
            t_tree = time_callable(lambda: tree(x.q, x.k, x.v, causal=True), repeats=repeats, device=device)
            out = tree(x.q, x.k, x.v, causal=True)
            inner = tree.last_inner_products.double()
            error = ((out.double() - ref.double()).pow(2).mean().sqrt() / x.v.double().pow(2).mean().sqrt()).item()
            early = resolve_early_exit(EARLY_EXIT[mode], device)
            rows.append(dict(n=n, dtype=str(dtype).removeprefix("torch."), device=str(device), method=method, e=e, P=P,
                             early_exit=f"{mode} ({'on' if early else 'off'})" if mode == "auto" else mode,
                             rounds_bound=bound, tree_ms=1e3 * t_tree.median_s, exact_ms=1e3 * t_exact.median_s,
                             ratio=t_tree.median_s / t_exact.median_s, inner_products_mean=inner.mean().item(),
                             inner_products_last=inner[:, -1].mean().item(), exact_inner_products_mean=(n + 1) / 2,
                             rel_rms_error=error, output_device=str(out.device)))
    return rows


def main(argv=None) -> list[dict]:
    parser = script_parser("Tree attention vs exact SDPA in the same dtype: time, inner products, error.",
                           quick_help="n = 256, 512")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--method", default="alignment", choices=[m for m in METHODS if m != "tree-less"])
    parser.add_argument("--e", type=float, nargs="+", default=[0.5], help="number_of_terms_exponent(s)")
    parser.add_argument("--P", type=int, default=16, help="parallelism")
    parser.add_argument("--query_block", type=int, default=None, help="queries per descent (default: the class's)")
    parser.add_argument("--early_exit", nargs="+", default=["auto"], choices=list(EARLY_EXIT),
                        help="descent modes to time: auto (the device's default), on (one host read per round), off")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.n = [256, 512]
    rows = []
    for n in args.n:
        for e in args.e:
            for r in measure(n, DTYPES[args.dtype], args.device, args.method, e, args.P, args.query_block,
                             args.repeats, seed=args.seed, modes=args.early_exit):
                rows.append(r)
                print(f"n = {n}, e = {e}, early_exit {r['early_exit']}: tree {r['tree_ms']:.1f} ms, exact "
                      f"{r['exact_ms']:.2f} ms ({r['ratio']:.1f}x), rounds bound {r['rounds_bound']}, inner products "
                      f"/ query {r['inner_products_mean']:.1f} (exact {r['exact_inner_products_mean']:.0f}), error "
                      f"{r['rel_rms_error']:.3g}", flush=True)
    path = write_table(rows, args.out / f"tree_speed_{torch.device(args.device).type}_{args.dtype}.csv", FIELDS)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
