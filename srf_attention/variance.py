"""Mean squared error of the softmax-kernel estimate for iid, orthogonal (ORF) and simplex (SimRF) features.

Reid et al. (ICML 2023) prove that simplex coupling gives the lowest MSE among weight-independent couplings of
positive random features (their Sec. 3) and show it in a pointwise kernel estimation experiment (Sec. 6.1):
the MSE grows with the norms of the inputs, and SimRF < ORF < iid throughout. This script measures that with the
features of ``common.random_features``, for the softmax kernel K(x, y) = exp(x.y) and its estimate (their eq. 1
with Performer's Lemma 1)

    K^(x, y) = (1/m) sum_i exp(w_i.(x + y) - (|x|^2 + |y|^2)/2).

For iid rows the MSE is known in closed form (Choromanski et al. 2021, Lemma 2;
``common.random_features.favor_relative_variance``):

    MSE_iid / K^2 = (exp(|x + y|^2) - 1) / m,

the line the iid measurements must lie on. We report the *normalised* MSE E[(K^ - K)^2] / K^2 averaged over
pairs (x, y), so that pairs with large kernel values do not drown the rest. Our settings (d = 6 unless --dim, x and
y of one fixed norm r with random directions, nb_features a multiple of d so every estimate uses whole blocks) follow
the
paper's experiment in spirit; the exact numbers of its figure are not reproduced here. The squared error is heavy
tailed (log-normal terms), so beyond r ~ 1 a few thousand draws underestimate the MSE (the iid points fall below
their closed form) and the three couplings are no longer separated by the measurement; the figure's error bars
(two standard errors) show where.

    python -m srf_attention.variance --quick       # seconds
    python -m srf_attention.variance               # assets/srf_variance.png and .csv
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from tqdm import tqdm

from common import plotting
from common.cli import script_parser
from common.random_features import FEATURE_TYPES, favor_relative_variance, positive_random_features, random_matrix

LABELS = {"iid": "iid (FAVOR+ with iid rows)", "orthogonal": "ORF (Performer)", "simplex": "SimRF (Reid et al.)"}


def kernel_estimates(feature_type: str, x: torch.Tensor, y: torch.Tensor, nb_features: int, draws: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``draws`` independent estimates K^(x_p, y_p) per pair p, shape (draws, P); x, y: (P, d) float64.

    One matrix of draws * nb_features rows is drawn: its blocks of d rows are independent, so consecutive groups
    of nb_features rows (a multiple of d) are independent projection matrices of the requested size.
    """
    d = x.shape[-1]
    if nb_features % d:
        raise ValueError(f"kernel_estimates: nb_features must be a multiple of the dimension d={d}, "
                         f"got {nb_features}")
    total = nb_features * draws
    w = random_matrix(feature_type, total, d, generator=generator, dtype=torch.float64)
    no_offset = torch.zeros((), dtype=torch.float64)
    phi_x, phi_y = (positive_random_features(t, w, 1.0, offset=no_offset)[0] for t in (x, y))
    # phi carries 1/sqrt(total) each; the estimate of one draw averages its own nb_features terms
    return (phi_x * phi_y * total).view(x.shape[0], draws, nb_features).mean(-1).T


def normalised_mse(feature_type: str, x: torch.Tensor, y: torch.Tensor, nb_features: int, draws: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[(K^ - K)^2] / K^2 per pair, its standard error per pair), from ``draws`` independent estimates."""
    exact = torch.exp((x * y).sum(-1))
    squared = ((kernel_estimates(feature_type, x, y, nb_features, draws, generator) - exact) / exact) ** 2
    return squared.mean(0), squared.std(0) / math.sqrt(draws)


def sample_pairs(n_pairs: int, dim: int, norm: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of length ``norm`` each with independent uniformly random directions, shape (n_pairs, dim) each."""
    x, y = (torch.randn(n_pairs, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    return norm * x / x.norm(dim=-1, keepdim=True), norm * y / y.norm(dim=-1, keepdim=True)


def sweep(norms, feature_counts, dim: int, n_pairs: int, draws: int, seed: int, progress: bool = True) -> list[dict]:
    """Mean normalised MSE over pairs for every (feature type, input norm, nb_features); one row each."""
    rows = []
    grid = [(r, m) for r in norms for m in feature_counts]
    for norm, m in tqdm(grid, desc="kernel MSE", disable=not progress):
        x, y = sample_pairs(n_pairs, dim, norm, torch.Generator().manual_seed(seed))
        for feature_type in FEATURE_TYPES:
            mse, stderr = normalised_mse(feature_type, x, y, m, draws, torch.Generator().manual_seed(seed + 1))
            rows.append(dict(feature_type=feature_type, norm=norm, nb_features=m, dim=dim,
                             mean_norm_mse=mse.mean().item(),
                             stderr=(stderr.pow(2).sum().sqrt() / n_pairs).item(),
                             iid_closed_form=favor_relative_variance(((x + y) ** 2).sum(-1), m).mean().item()))
    return rows


def plot(rows: list[dict], norm_fixed: float, m_fixed: int, path: Path) -> Path:
    fig, axes = plotting.new_figure(ncols=2)
    panels = [(axes[0][0], "norm", lambda r: r["nb_features"] == m_fixed, f"m = {m_fixed} features",
               "input norm r = |x| = |y|"),
              (axes[0][1], "nb_features", lambda r: r["norm"] == norm_fixed, f"r = {norm_fixed}",
               "number of random features m")]
    for ax, key, keep, title, xlabel in panels:
        for feature_type in FEATURE_TYPES:
            sel = sorted((r for r in rows if keep(r) and r["feature_type"] == feature_type), key=lambda r: r[key])
            color = {"iid": "#7f7f7f", "orthogonal": plotting.method_color("performer"),
                     "simplex": plotting.method_color("srf")}[feature_type]
            ax.errorbar([r[key] for r in sel], [r["mean_norm_mse"] for r in sel],
                        yerr=[2 * r["stderr"] for r in sel], marker="o", ms=3, color=color,
                        label=LABELS[feature_type])
        closed = sorted((r for r in rows if keep(r) and r["feature_type"] == "iid"), key=lambda r: r[key])
        ax.plot([r[key] for r in closed], [r["iid_closed_form"] for r in closed], "k--", lw=1,
                label="iid closed form (Performer Lemma 2)")
        ax.set_yscale("log")
        if key == "nb_features":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("normalised MSE  E[(K^ - K)^2] / K^2")
        ax.set_title(f"softmax kernel estimate, d = {rows[0]['dim']}, {title}")
        ax.legend()
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__.split("\n")[0],
                           quick_help="a small grid that runs in seconds",
                           device_help="only 'cpu': the sweep is small and float64",
                           out_help="folder for srf_variance.png / .csv")
    parser.add_argument("--dim", type=int, default=6, help="input dimension d")
    parser.add_argument("--pairs", type=int, default=64, help="pairs (x, y) per setting")
    parser.add_argument("--draws", type=int, default=2000, help="independent feature draws per pair")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("--device: this sweep runs on the CPU only")
    d = args.dim
    norms = [0.25, 0.5, 0.75, 1.0] if args.quick else [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25]
    feature_counts = [d, 4 * d] if args.quick else [d, 2 * d, 4 * d, 8 * d, 16 * d]
    draws = min(args.draws, 300) if args.quick else args.draws
    norm_fixed = 0.5
    rows = sweep(sorted(set(norms + [norm_fixed])), feature_counts, d, args.pairs, draws, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "srf_variance.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path = plot(rows, norm_fixed, d, args.out / "srf_variance.png")
    print(f"{'r':>6} {'m':>4} " + " ".join(f"{t:>12}" for t in FEATURE_TYPES) + "   SimRF/ORF")
    for norm in sorted({r["norm"] for r in rows}):
        for m in feature_counts:
            cell = {r["feature_type"]: r["mean_norm_mse"] for r in rows if r["norm"] == norm and r["nb_features"] == m}
            print(f"{norm:>6.3f} {m:>4} " + " ".join(f"{cell[t]:>12.4g}" for t in FEATURE_TYPES)
                  + f"   {cell['simplex'] / cell['orthogonal']:.3f}")
    print(f"wrote {path} and {args.out / 'srf_variance.csv'}")
    return rows


if __name__ == "__main__":
    main()
