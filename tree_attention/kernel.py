"""Kernel analysis of the mass estimators (the report's ``kernel.py`` experiment, its Sec. 4.4 and Eq. (9)).

For a query q and key k with given norms, the key's direction interpolated between q's (aligned, a = 1) and an
independent random direction (a = 0), each random-feature method estimates the softmax kernel exp(S q . k); over
``--draws`` independent draws of its R features we report the mean, the standard deviation and their ratio
std / mean (the relative noise a descent step sees), against the true kernel. ``positive_alignment`` is not
random: its "estimate" exp(S f(q) . f(k)) is a different kernel, shown against the true one (std 0).

The report's FAVOR+ variance (Eq. (9); Choromanski et al. 2021, Lemma 2, i.i.d. positive features): with
x = S^(1/2) q and y = S^(1/2) k, one feature has Var / mean^2 = exp(|x + y|^2) - 1, so R features give
std / mean = sqrt((exp(|x + y|^2) - 1) / R). It is printed for an orthogonal (q . k = 0) and an aligned (q = k)
pair of the given norms next to the empirical ratio (orthogonal, antithetic features as the descent uses them).

    python -m tree_attention.kernel --method FAVOR+ --quick
    python -m tree_attention.kernel --method FAVOR+ --D 64 --R 128 --query_norm_value 8 --key_norm_value 8

``--scaling`` multiplies the default S = 1/sqrt(D), as in the report; ``--exp`` is the report's exponent p of the
FAVOR+ReLU features ReLU(w . x)^p (higher: more discriminative, more variance); ``--orth 0`` draws i.i.d. features.
"""
from __future__ import annotations

import math

import torch

from common import plotting
from common.cli import script_parser
from common.random_features import favor_relative_variance

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


def kernel_statistics(method: str, q, k, scale: float, R: int, draws: int, seed: int = 0, orthogonal: bool = True,
                      relu_power: float = 1.0) -> dict:
    """Mean, std and std / mean of the method's estimate of exp(S q . k) over ``draws`` feature draws."""
    estimates = []
    # the features' own stream: a generator seeded like the one that drew q and k would correlate them with q
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    for _ in range(1 if method == "positive_alignment" else draws):  # positive_alignment is deterministic
        est = MassEstimator(method, q.shape[-1], scale, R=R, generator=generator, orthogonal=orthogonal,
                            relu_power=relu_power)
        inner = est.features(q) @ est.features(k)
        estimates.append(torch.exp(scale * inner) if method == "positive_alignment" else inner)
    values = torch.stack(estimates)
    mean = values.mean().item()
    std = values.std().item() if len(values) > 1 else 0.0
    return dict(true=math.exp(scale * (q @ k).item()), mean=mean, std=std,
                ratio=std / abs(mean) if mean else float("inf"))


def favor_ratio_eq9(q_norm: float, k_norm: float, cosine: float, scale: float, R: int) -> float:
    """std / mean of FAVOR+ with R i.i.d. positive features: sqrt((exp(|x + y|^2) - 1) / R), x = sqrt(S) q
    (the report's Eq. (9) = Performer's Lemma 2, ``common.random_features.favor_relative_variance``)."""
    sum_sq = scale * (q_norm ** 2 + k_norm ** 2 + 2 * cosine * q_norm * k_norm)
    return math.sqrt(favor_relative_variance(sum_sq, R))


def main(argv=None) -> dict:
    """Prints the test-example statistics, writes the figure; returns {'orthogonal': stats, 'aligned': stats}."""
    parser = script_parser("Mean, std and std/mean of kernel estimates vs the true kernel.",
                           quick_help="at most 30 draws, fewer points",
                           device_help="(the analysis runs on the CPU)")
    parser.add_argument("--method", default="FAVOR+", choices=KERNEL_METHODS)
    parser.add_argument("--D", type=int, default=64, help="head dimension")
    parser.add_argument("--R", type=int, default=None, help="random features (default 128; 64 for RandomFourierFeatures)")
    parser.add_argument("--orth", type=int, default=1, choices=[0, 1], help="orthogonal (1) or i.i.d. (0) features")
    parser.add_argument("--query_norm_value", type=float, default=8.0, help="|q|")
    parser.add_argument("--key_norm_value", type=float, default=8.0, help="|k|")
    parser.add_argument("--scaling", type=float, default=1.0, help="factor on S = 1/sqrt(D)")
    parser.add_argument("--exp", type=float, default=1.0, help="exponent p of the FAVOR+ReLU features ReLU(.)^p")
    parser.add_argument("--draws", type=int, default=200, help="independent feature draws per point")
    args = parser.parse_args(argv)
    if args.R is None:
        args.R = 64 if args.method == "RandomFourierFeatures" else 128
    if args.quick:
        args.draws = min(args.draws, 30)
    scale = args.scaling / math.sqrt(args.D)
    options = dict(orthogonal=bool(args.orth), relu_power=args.exp)
    g = torch.Generator().manual_seed(args.seed)
    qn, kn = args.query_norm_value, args.key_norm_value
    if args.method == "FAVOR+":
        for name, cosine in (("orthogonal (q . k = 0)", 0.0), ("aligned (q = k direction)", 1.0)):
            print(f"Eq. (9), FAVOR+ std/mean with R = {args.R} i.i.d. features, |q| = {qn}, |k| = {kn}, D = {args.D}, "
                  f"S = {scale:.4g}, {name}: {favor_ratio_eq9(qn, kn, cosine, scale, args.R):.4g}")
    tests = {}
    for name, a in (("orthogonal", 0.0), ("aligned", 1.0)):
        q, k = pair(args.D, qn, kn, a, g)
        if a == 0.0:  # exactly orthogonal: remove q's component from k
            k = k - (k @ q) / (q @ q) * q
            k = kn * k / k.norm()
        tests[name] = test = kernel_statistics(args.method, q, k, scale, args.R, args.draws, args.seed, **options)
        print(f"empirical {args.method}, {name} pair, R = {args.R}, {args.draws} draws: true {test['true']:.4g}, "
              f"mean {test['mean']:.4g}, std {test['std']:.4g}, std/mean {test['ratio']:.4g}")
    norms = [0.5, 1, 2, 4, 6, 8] if args.quick else [0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    alignments = [0.0, 0.25, 0.5, 0.75, 1.0]
    by_norm = [kernel_statistics(args.method, *pair(args.D, n, n, 1.0, g), scale, args.R, args.draws, args.seed,
                                 **options) for n in norms]
    by_align = [kernel_statistics(args.method, *pair(args.D, qn, kn, a, g), scale, args.R, args.draws, args.seed,
                                  **options) for a in alignments]
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
        ax.set_title(f"{args.method}, D = {args.D}, R = {args.R}, {args.draws} draws", fontsize=9)
        ax.legend()
    name = args.method.replace("+", "plus")
    print(f"wrote {plotting.save_figure(fig, args.out / f'tree_kernel_{name}.png')}")
    return tests


if __name__ == "__main__":
    main()
