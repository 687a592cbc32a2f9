"""The gradient descent experiment (Haris 2024, Sec. 6): train with exact vs approximate attention gradients.

Parameters Q, K, V (n x d, one head) start random and are fitted by gradient descent to a target output
Y = softmax(S Q* K*^T) V* of random (Q*, K*, V*), loss L = ||Attn(Q, K, V) - Y||_F^2 / n. Each variant computes
its gradient differently; the loss of every variant is always evaluated with exact attention, so the curves
compare how well each gradient estimator optimises the true objective:

- ``exact``: autograd through exact attention;
- ``knn-sampled``: kNN forward (top-k + uniform tail) with the sampled gradient estimators (``backward_pass.py``);
- ``knn-autograd``: autograd through the kNN estimator (gathered keys, indices held fixed).

    python -m knn_attention.experiment_grad_descent --quick

``--paper`` runs the paper's own setting instead (Sec. 6; the authors' ``backward_pass/experiment_grad_descent.py``):
N = 100 tokens, d = 3, Q, K, V with N(0, 4) entries, a fixed random readout w (d x 1) and random binary targets t;
output o = Attn(Q, K, V) w, losses binary cross-entropy with logits (BCE) and polynomial ones (quadratic
mean (o - t)^2, cubic mean |o - t|^3); plain gradient descent with lr 0.5 on Q and V only (K fixed), "naive" =
autograd through exact attention vs "fast" = the kNN method with the paper's sampled gradients
(``gradient='sampled'``, k = ceil(sqrt(N)), the default (adaptive) forward, l = 32 samples per query, dV by the
random-walk estimator, ``dv_estimator='walk'``). The loss is always evaluated with exact attention. The same run records the attention
error during training: the relative Frobenius error of the fast variant's kNN forward against exact attention on
its current Q, K, V. Writes ``knn_grad_descent_paper.{csv,png}`` and ``knn_attention_error_training.{csv,png}``.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from tqdm import tqdm

from common import get_attention, plotting, softmax_attention
from common.metrics import relative_frobenius_error

VARIANTS = {"exact": ("exact", {}),
            "knn-sampled": ("knn", {"gradient": "sampled", "index": "torch", "estimator": "topk_uniform_tail"}),
            "knn-autograd": ("knn", {"gradient": "autograd", "estimator": "topk_uniform_tail"})}


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


PAPER_LOSSES = {"bce": lambda o, t: torch.nn.functional.binary_cross_entropy_with_logits(o, t),
                "quadratic": lambda o, t: ((o - t) ** 2).mean(),
                "cubic": lambda o, t: (o - t).abs().pow(3).mean()}


def run_paper(loss: str, n: int = 100, d: int = 3, iters: int = 300, lr: float = 0.5, seed: int = 0,
              progress: bool = True) -> dict[str, list[float]]:
    """The paper's setting (module docstring): exact-loss curves of naive and fast gradients, and the fast
    forward's relative error against exact attention at each iteration."""
    gen = torch.Generator().manual_seed(seed)
    start = [2 * torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    targets = torch.randint(0, 2, (n,), generator=gen).double()
    readout = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    objective = lambda out: PAPER_LOSSES[loss]((out[0, 0] @ readout).squeeze(-1), targets)
    fast = get_attention("knn", gradient="sampled", num_samples=32, dv_estimator="walk", index="torch", seed=seed)
    curves = {"naive": [], "fast": [], "fast_forward_error": []}
    for name, attn in (("naive", get_attention("exact")), ("fast", fast)):
        q, k, v = (t.clone() for t in start)
        q.requires_grad_(), v.requires_grad_()
        for _ in tqdm(range(iters + 1), desc=f"{loss} {name}", disable=not progress):
            with torch.no_grad():
                exact = softmax_attention(q, k, v)
                curves[name].append(objective(exact).item())
                if name == "fast":
                    curves["fast_forward_error"].append(relative_frobenius_error(attn(q, k, v), exact))
            if len(curves[name]) > iters:
                break
            q.grad = v.grad = None
            objective(attn(q, k, v)).backward()
            with torch.no_grad():
                q -= lr * q.grad
                v -= lr * v.grad
    return curves


def main_paper(args) -> dict[str, dict[str, list[float]]]:
    results = {loss: run_paper(loss, iters=args.iters, lr=args.lr, seed=args.seed) for loss in args.losses}
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "knn_grad_descent_paper.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *[f"{loss}_{name}" for loss in results for name in ("naive", "fast")]])
        for i in range(args.iters + 1):
            w.writerow([i, *[results[loss][name][i] for loss in results for name in ("naive", "fast")]])
    with (args.out / "knn_attention_error_training.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *[f"{loss}_rel_fro" for loss in results]])
        for i in range(args.iters + 1):
            w.writerow([i, *[results[loss]["fast_forward_error"][i] for loss in results]])
    fig, axes = plotting.new_figure(ncols=len(results), width=4.2)
    for ax, (loss, curves) in zip(axes[0], results.items()):
        ax.plot(curves["naive"], color="black", label="naive gradients (autograd, exact)")
        ax.plot(curves["fast"], color=plotting.method_color("knn"), ls="--", label="fast gradients (kNN, sampled)")
        ax.set_xlabel("gradient descent iteration")
        ax.set_ylabel(f"{loss} loss (exact attention)")
        ax.set_title(f"N = 100, d = 3, lr = {args.lr}, Q and V updated", fontsize=8)
        ax.legend(fontsize=7)
    paths = [plotting.save_figure(fig, args.out / "knn_grad_descent_paper.png")]
    fig, axes = plotting.new_figure()
    for loss, curves in results.items():
        axes[0][0].plot(curves["fast_forward_error"], label=f"{loss} run")
    axes[0][0].set_xlabel("gradient descent iteration")
    axes[0][0].set_ylabel("relative Frobenius error of kNN forward")
    axes[0][0].set_title("attention error during training (fast run)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    paths.append(plotting.save_figure(fig, args.out / "knn_attention_error_training.png"))
    for loss, curves in results.items():
        err = curves["fast_forward_error"]
        print(f"{loss:>9}: naive {curves['naive'][0]:.4f} -> {curves['naive'][-1]:.4f}, fast {curves['fast'][0]:.4f} "
              f"-> {curves['fast'][-1]:.4f}; kNN forward error {err[0]:.3f} -> {err[-1]:.3f} "
              f"(max {max(err):.3f})")
    print("wrote " + ", ".join(map(str, paths)))
    return results


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
    parser.add_argument("--paper", action="store_true", help="the paper's setting (N = 100, d = 3, BCE and "
                        "polynomial losses, Q and V updated; --iters, --lr, --seed apply)")
    parser.add_argument("--losses", nargs="+", default=list(PAPER_LOSSES), choices=list(PAPER_LOSSES))
    args = parser.parse_args(argv)
    if args.paper:
        if args.quick:
            args.iters = 30
        return main_paper(args)
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
