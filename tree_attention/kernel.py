"""Kernel analysis of the mass estimators (the report's ``kernel.py`` experiment).

For a query q and key k with given norms, the key's direction interpolated between q's (aligned, a = 1) and an
independent random direction (a = 0), each random-feature method estimates the softmax kernel exp(S q . k); over
``--exp`` independent draws of its R features we report the mean, the standard deviation and their ratio
std / mean (the relative noise a descent step sees), against the true kernel. ``positive_alignment`` is not
random: its "estimate" exp(S f(q) . f(k)) is a different kernel, shown against the true one (std 0).

    python -m tree_attention.kernel --method FAVOR+ --quick
    python -m tree_attention.kernel --method FAVOR+ --D 64 --R 64 --query_norm_value 8 --key_norm_value 8

The report's test example (D = 64, q equal to a key of i.i.d. N(0, 1) entries, so |q| = |k| ~ 8, S = 1/8, R = 64)
is printed as the first line.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from common import plotting

from .mass_estimators import MassEstimator

KERNEL_METHODS = ("FAVOR+", "FAVOR+ReLU", "positive_alignment", "RandomFourierFeatures")


def pair(D: int, query_norm: float, key_norm: float, alignment: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k of the given norms, k's direction = normalised(a * q_dir + (1 - a) * random_dir)."""
    q_dir = torch.randn(D, generator=generator, dtype=torch.float64)
    q_dir /= q_dir.norm()
    r_dir = torch.randn(D, generator=generator, dtype=torch.float64)
    r_dir /= r_dir.norm()
    k_dir = alignment * q_dir + (1 - alignment) * r_dir
    return query_norm * q_dir, key_norm * k_dir / k_dir.norm()


def kernel_statistics(method: str, q, k, scale: float, R: int, experiments: int, seed: int = 0) -> dict:
    """Mean, std and std / mean of the method's estimate of exp(S q . k) over ``experiments`` feature draws."""
    estimates = []
    for e in range(experiments):
        est = MassEstimator(method, q.shape[-1], scale, R=R, generator=torch.Generator().manual_seed(seed + e))
        if method == "positive_alignment":
            fq, fk = est.query_features(q), est.key_features(k)
            estimates.append(torch.exp(scale * fq @ fk))
        else:
            estimates.append(est.query_features(q.view(1, -1)) @ est.key_features(k.view(1, -1)).T)
        if method == "positive_alignment":
            break  # deterministic
    values = torch.stack([x.reshape(()) for x in estimates])
    mean = values.mean().item()
    std = values.std().item() if len(values) > 1 else 0.0
    return dict(true=math.exp(scale * (q @ k).item()), mean=mean, std=std,
                ratio=std / abs(mean) if mean else float("inf"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Mean, std and std/mean of kernel estimates vs the true kernel.")
    parser.add_argument("--method", default="FAVOR+", choices=KERNEL_METHODS)
    parser.add_argument("--D", type=int, default=64, help="head dimension")
    parser.add_argument("--R", type=int, default=64, help="random features")
    parser.add_argument("--orth", type=int, default=1, choices=[0, 1],
                        help="orthogonal features (1; the estimators here always use ORFs, 0 is refused)")
    parser.add_argument("--query_norm_value", type=float, default=8.0)
    parser.add_argument("--key_norm_value", type=float, default=8.0)
    parser.add_argument("--scaling", type=float, default=None, help="S (default 1/sqrt(D))")
    parser.add_argument("--exp", type=int, default=200, help="independent feature draws per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="--exp 30, fewer points")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS)
    args = parser.parse_args(argv)
    if not args.orth:
        raise SystemExit("--orth 0: this repository's FAVOR+ estimators use orthogonal features only")
    if args.quick:
        args.exp = 30
    scale = 1 / math.sqrt(args.D) if args.scaling is None else args.scaling
    g = torch.Generator().manual_seed(args.seed)
    q, k = pair(args.D, args.query_norm_value, args.key_norm_value, 1.0, g)
    test = kernel_statistics(args.method, q, k, scale, args.R, args.exp, args.seed)
    if args.method == "FAVOR+":
        # i.i.d. positive features: Var[one feature product] = exp(2|q'+k'|^2 - |q'|^2 - |k'|^2) - exp(2 q'.k')
        qs, ks = q * math.sqrt(scale), k * math.sqrt(scale)
        log_second = 2 * ((qs + ks) @ (qs + ks)).item() - (qs @ qs).item() - (ks @ ks).item()
        log_mean2 = 2 * (qs @ ks).item()
        ratio = math.sqrt(math.expm1(log_second - log_mean2) / args.R)
        print(f"analytical std/mean of FAVOR+ with {args.R} i.i.d. features at the test example: {ratio:.4g} "
              "(orthogonal features lower it; an empirical std of so heavy-tailed an estimate is far smaller)")
    print(f"test example (aligned, |q| = {args.query_norm_value}, |k| = {args.key_norm_value}, D = {args.D}, "
          f"R = {args.R}, S = {scale:.4g}): true {test['true']:.4g}, mean {test['mean']:.4g}, std {test['std']:.4g}, "
          f"std/mean {test['ratio']:.4g}")
    norms = [0.5, 1, 2, 4, 6, 8] if args.quick else [0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    alignments = [0.0, 0.25, 0.5, 0.75, 1.0]
    by_norm = [kernel_statistics(args.method, *pair(args.D, n, n, 1.0, g), scale, args.R, args.exp, args.seed)
               for n in norms]
    by_align = [kernel_statistics(args.method, *pair(args.D, args.query_norm_value, args.key_norm_value, a, g),
                                  scale, args.R, args.exp, args.seed) for a in alignments]
    fig, axes = plotting.new_figure(ncols=2)
    ax_n, ax_a = axes[0]
    ax_n.plot(norms, [r["ratio"] for r in by_norm], "o-", label="std / mean")
    ax_n.plot(norms, [abs(r["mean"] / r["true"] - 1) for r in by_norm], "s--", label="|mean / true - 1|")
    ax_n.set_xlabel("|q| = |k| (aligned directions)")
    ax_a.plot(alignments, [r["ratio"] for r in by_align], "o-", label="std / mean")
    ax_a.plot(alignments, [abs(r["mean"] / r["true"] - 1) for r in by_align], "s--", label="|mean / true - 1|")
    ax_a.set_xlabel(f"alignment a of k with q (|q| = {args.query_norm_value}, |k| = {args.key_norm_value})")
    for ax in (ax_n, ax_a):
        ax.set_yscale("log")
        ax.set_ylabel("relative noise / bias (ratio)")
        ax.set_title(f"{args.method}, D = {args.D}, R = {args.R}, {args.exp} draws")
        ax.legend()
    name = args.method.replace("+", "plus")
    print(f"wrote {plotting.save_figure(fig, args.out / f'tree_kernel_{name}.png')}")
    return test


if __name__ == "__main__":
    main()
