"""Speed of tree attention against exact attention (SDPA) in the same dtype, with its cost and error beside it.

For each sequence length n: causal forward of ``tree`` (B = 1, H = 8, D = 64, clustered synthetic q/k/v, the
descent and everything else on ``--device``) and of exact attention through
``torch.nn.functional.scaled_dot_product_attention`` in the same dtype, medians of ``--repeats`` timed runs after
one warm-up (``common.bench.time_callable``, CUDA-synchronised). Beside the time: the inner products q . sum per
query that the descent spent (mean over queries, and at the last query, against n for exact attention; the
count ``tree.py`` defines) and the error rms(tree - exact) / rms(v) on the same input. One CSV row per n:
``<out>/tree_speed_<device>_<dtype>.csv``.

    python -m tree_attention.speed --quick                                   # n = 256, 512 on the CPU
    python -m tree_attention.speed --device cuda --dtype bfloat16 --n 16384 65536 131072
"""
from __future__ import annotations

import csv

import torch

from common.attention import ExactAttention
from common.bench import time_callable
from common.cli import script_parser
from common.data import synthetic_qkv

from .mass_estimators import METHODS
from .np_attention import TreeAttention

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(n: int, dtype: torch.dtype, device, method: str = "alignment", e: float = 0.5, P: int = 16,
            query_block: int | None = None, repeats: int = 3, heads: int = 8, head_dim: int = 64, seed: int = 0) -> dict:
    """One row: times (ms) of tree and exact, their ratio, inner products per query, error vs exact."""
    x = synthetic_qkv("clustered", 1, heads, n, n, head_dim, seed=seed, dtype=dtype, device=device)
    tree = TreeAttention(method=method, number_of_terms_exponent=e, parallelism=P, query_block=query_block,
                         seed=seed)
    exact = ExactAttention()
    with torch.no_grad():
        t_tree = time_callable(lambda: tree(x.q, x.k, x.v, causal=True), repeats=repeats, device=device)
        t_exact = time_callable(lambda: exact(x.q, x.k, x.v, causal=True), repeats=repeats, device=device)
        out, ref = tree(x.q, x.k, x.v, causal=True), exact(x.q, x.k, x.v, causal=True)
    inner = tree.last_inner_products.double()
    error = ((out.double() - ref.double()).pow(2).mean().sqrt() / x.v.double().pow(2).mean().sqrt()).item()
    return dict(n=n, dtype=str(dtype).removeprefix("torch."), device=str(device), method=method, e=e, P=P,
                tree_ms=1e3 * t_tree.median_s, exact_ms=1e3 * t_exact.median_s,
                ratio=t_tree.median_s / t_exact.median_s, inner_products_mean=inner.mean().item(),
                inner_products_last=inner[:, -1].mean().item(), exact_inner_products_mean=(n + 1) / 2,
                rel_rms_error=error, output_device=str(out.device))


def main(argv=None) -> list[dict]:
    parser = script_parser("Tree attention vs exact SDPA in the same dtype: time, inner products, error.",
                           quick_help="n = 256, 512")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--method", default="alignment", choices=[m for m in METHODS if m != "tree-less"])
    parser.add_argument("--e", type=float, default=0.5, help="number_of_terms_exponent")
    parser.add_argument("--P", type=int, default=16, help="parallelism")
    parser.add_argument("--query_block", type=int, default=None, help="queries per descent (default: the class's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.n = [256, 512]
    rows = []
    for n in args.n:
        rows.append(measure(n, DTYPES[args.dtype], args.device, args.method, args.e, args.P, args.query_block,
                            args.repeats, seed=args.seed))
        r = rows[-1]
        print(f"n = {n}: tree {r['tree_ms']:.1f} ms, exact {r['exact_ms']:.2f} ms ({r['ratio']:.1f}x), inner "
              f"products / query {r['inner_products_mean']:.1f} (exact {r['exact_inner_products_mean']:.0f}), "
              f"error {r['rel_rms_error']:.3g}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tree_speed_{torch.device(args.device).type}_{args.dtype}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
