"""The gradient descent experiment (Haris 2024, Sec. 6): train with exact vs approximate attention gradients.

Parameters Q, K, V (n x d, one head) start random and are fitted by gradient descent to a target output
Y = softmax(S Q* K*^T) V* of random (Q*, K*, V*), loss L = ||Attn(Q, K, V) - Y||_F^2 / n. Each variant computes
its gradient differently; the loss of every variant is always evaluated with exact attention, so the curves
compare how well each gradient estimator optimises the true objective:

- ``exact``: autograd through exact attention;
- ``knn-sampled``: kNN forward (top-k + uniform tail) with the sampled gradient estimators (``backward_pass.py``);
- ``knn-autograd``: autograd through the kNN estimator (gathered keys, indices held fixed).

    python -m knn_attention.experiment_grad_descent --quick
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from tqdm import tqdm

from common import get_attention, plotting, softmax_attention

VARIANTS = {"exact": ("exact", {}),
            "knn-sampled": ("knn", {"gradient": "sampled", "index": "torch"}),
            "knn-autograd": ("knn", {"gradient": "autograd"})}


def run(n: int = 512, d: int = 32, iters: int = 200, lr: float = 0.5, seed: int = 0, device="cpu",
        progress: bool = True) -> dict[str, list[float]]:
    """Loss (exact objective) after each iteration for every variant, all from the same start and target."""
    gen = torch.Generator().manual_seed(seed)
    target = softmax_attention(*(torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) for _ in range(3)))
    start = [torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    target = target.to(device)
    curves = {}
    for name, (method, options) in VARIANTS.items():
        attn = get_attention(method, **({**options, "seed": seed} if method == "knn" else options))
        params = [p.clone().to(device).requires_grad_() for p in start]
        opt = torch.optim.SGD(params, lr=lr)
        losses = []
        for _ in tqdm(range(iters), desc=name, disable=not progress):
            with torch.no_grad():
                losses.append(((softmax_attention(*params) - target) ** 2).sum().item() / n)
            opt.zero_grad()
            ((attn(*params) - target) ** 2).sum().div(n).backward()
            opt.step()
        with torch.no_grad():
            losses.append(((softmax_attention(*params) - target) ** 2).sum().item() / n)
        curves[name] = losses
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description="Loss over gradient descent with exact vs kNN gradients.")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="n=128, 40 iterations")
    parser.add_argument("--out", type=Path, default=plotting.ASSETS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.iters = 128, 40
    curves = run(args.n, args.d, args.iters, args.lr, args.seed, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "knn_grad_descent.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *curves])
        for i, row in enumerate(zip(*curves.values())):
            w.writerow([i, *row])
    fig, axes = plotting.new_figure()
    ax = axes[0][0]
    for name, losses in curves.items():
        ax.plot(losses, label=name, color=plotting.method_color("exact" if name == "exact" else "knn"),
                ls={"exact": "-", "knn-sampled": "--", "knn-autograd": ":"}[name])
    ax.set_yscale("log")
    ax.set_xlabel("gradient descent iteration")
    ax.set_ylabel("loss ||Attn(Q,K,V) - Y||² / n (exact attention)")
    ax.set_title(f"n = {args.n}, d = {args.d}, SGD lr = {args.lr}")
    ax.legend()
    path = plotting.save_figure(fig, args.out / "knn_grad_descent.png")
    for name, losses in curves.items():
        print(f"{name:>13}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"wrote {path}")
    return curves


if __name__ == "__main__":
    main()
