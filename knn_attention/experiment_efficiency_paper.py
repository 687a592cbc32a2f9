"""The paper's efficiency experiment (Haris 2024, Sec. 6, "efficiency"), and the cost of estimator (c) and of the
sampled gradients as n grows.

For each n (Nq = Nk = n, one head, d = 64, Gaussian q, k, v) it measures, against exact attention
(``common``'s ``exact``, torch SDPA) timed on the same input in the same run:

- ``knn-sqrt`` / ``knn-quarter``: the paper's two arms, k = ceil(sqrt(n)) and k = ceil(n^(1/4)) retrieved keys,
  estimator (b) (top-k + l = k uniform tail samples), faiss ``ivf`` index (nlist = sqrt(n), 8 probes);
- ``gumbel``: estimator (c), lazy Gumbel sampling with a fixed l = 32 samples per query (the number of samples
  comes from the accuracy asked, not from n), k = ceil(sqrt(n)), exact ``torch`` top-k (the sampler's tail bound
  needs the true top set; the top-k search itself is a dense product, so its time is reported apart);
- ``sampled-grad``: forward and backward of (b) with ``gradient='sampled'`` (the Sec. 5 estimators, l = 32
  samples per query at backward time), against exact attention's forward and backward (autograd).

Columns: time (median of ``--repeats``), peak resident memory added by one call (``common.bench``), relative
Frobenius error of the forward output, and for ``gumbel`` the index search time and the score evaluations per
query (|S_i| + the tail candidates actually scored).

    python -m knn_attention.experiment_efficiency_paper --quick        # n = 2^9 .. 2^11
    python -m knn_attention.experiment_efficiency_paper                 # n = 2^10 .. 2^15, and 10^5 with --n
"""
from __future__ import annotations

import csv
import math

import torch

from common import get_attention, plotting
from common.bench import peak_memory_bytes, time_callable
from common.cli import script_parser
from common.data import synthetic_qkv
from common.metrics import relative_frobenius_error

from .index import IndexOptions, top_k_indices
from .softmax_expectation import lazy_gumbel_sample, retrieved_set

FIELDS = ["n", "config", "exact_s", "knn_s", "speedup", "exact_peak_mib", "knn_peak_mib", "rel_fro", "search_s",
          "evaluations_per_query"]
NUM_SAMPLES = 32


def _configs(n: int) -> dict[str, dict]:
    root, quarter = math.ceil(math.sqrt(n)), math.ceil(n ** 0.25)
    return {"knn-sqrt": dict(k=root, num_samples=root, index="ivf"),
            "knn-quarter": dict(k=quarter, num_samples=quarter, index="ivf"),
            "gumbel": dict(k=root, num_samples=NUM_SAMPLES, estimator="gumbel", index="torch"),
            "sampled-grad": dict(k=root, num_samples=NUM_SAMPLES, index="torch", gradient="sampled")}


def _forward_backward(attn, x, grad):
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    out = attn(q, k, v)
    out.backward(grad)
    return out.detach()


def _evaluations(x, k: int, seed: int) -> float:
    """Mean score evaluations per query of one lazy Gumbel call (|S_i| + the scored tail candidates)."""
    top = retrieved_set(x.q, x.k, top_k_indices(x.q, x.k, k, IndexOptions("torch")),
                        torch.full((x.q.shape[2],), x.k.shape[2]), x.q.shape[-1] ** -0.5)
    _, evals = lazy_gumbel_sample(x.q, x.k, top, NUM_SAMPLES, x.q.shape[-1] ** -0.5,
                                  torch.Generator().manual_seed(seed))
    return evals.double().mean().item()


def measure(n: int, configs: list[str], d: int, repeats: int, seed: int, device) -> list[dict]:
    x = synthetic_qkv("gaussian", 1, 1, n, n, d, seed=seed, device=device)
    grad = torch.randn(x.q.shape[:3] + (x.v.shape[-1],), generator=torch.Generator().manual_seed(seed)).to(device)
    exact = get_attention("exact")
    reference = exact(x.q, x.k, x.v)
    rows = []
    for name in configs:
        options = _configs(n)[name]
        knn = get_attention("knn", seed=seed, **options)
        if name == "sampled-grad":
            run_exact, run_knn = (lambda a=a: _forward_backward(a, x, grad) for a in (exact, knn))
        else:
            run_exact, run_knn = (lambda a=a: torch.no_grad()(a)(x.q, x.k, x.v) for a in (exact, knn))
        _, exact_peak = peak_memory_bytes(run_exact, device)
        out, knn_peak = peak_memory_bytes(run_knn, device)
        t_exact = time_callable(run_exact, warmup=0, repeats=repeats, device=device).median_s
        t_knn = time_callable(run_knn, warmup=0, repeats=repeats, device=device).median_s
        rows.append(dict(n=n, config=name, exact_s=t_exact, knn_s=t_knn, speedup=t_exact / t_knn,
                         exact_peak_mib=(exact_peak or 0) / 2 ** 20, knn_peak_mib=(knn_peak or 0) / 2 ** 20,
                         rel_fro=relative_frobenius_error(out, reference), search_s=knn.last_times.search_s,
                         evaluations_per_query=_evaluations(x, options["k"], seed) if name == "gumbel" else ""))
    return rows


def plot(rows: list[dict], configs: list[str], path):
    fig, axes = plotting.new_figure(ncols=3, width=4.2)
    time_ax, mem_ax, err_ax = axes[0]
    colors = dict(zip(configs, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    for name in configs:
        pts = [r for r in rows if r["config"] == name]
        ns = [r["n"] for r in pts]
        time_ax.plot(ns, [r["knn_s"] for r in pts], "s-", color=colors[name], label=name)
        time_ax.plot(ns, [r["exact_s"] for r in pts], "o:", color=colors[name], alpha=0.6,
                     label=f"exact ({'fwd+bwd' if name == 'sampled-grad' else 'fwd'})")
        mem_ax.plot(ns, [max(r["knn_peak_mib"], 1e-2) for r in pts], "s-", color=colors[name], label=name)
        err_ax.plot(ns, [r["rel_fro"] for r in pts], "s-", color=colors[name], label=name)
    ns = sorted({r["n"] for r in rows})
    mem_ax.plot(ns, [max(next(r["exact_peak_mib"] for r in rows if r["n"] == n and r["config"] != "sampled-grad"),
                         1e-2) for n in ns], "o:", color="black", label="exact (fwd)")
    for ax, label in ((time_ax, "median time (s)"), (mem_ax, "peak memory added (MiB)"),
                      (err_ax, "relative Frobenius error of output")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    time_ax.set_title("time vs exact (same input, same run)", fontsize=9)
    mem_ax.set_title("memory", fontsize=9)
    err_ax.set_title("forward error (Gaussian q, k, v)", fontsize=9)
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser("The kNN paper's efficiency experiment: k = sqrt(n) and n^(1/4) arms, estimator (c) and "
                           "the sampled gradients, time and memory vs exact as n grows.",
                           quick_help="n = 512, 1024, 2048, one timed run")
    parser.add_argument("--n", type=int, nargs="+", default=[2 ** p for p in range(10, 16)])
    parser.add_argument("--configs", nargs="+", default=["knn-sqrt", "knn-quarter", "gumbel", "sampled-grad"],
                        choices=["knn-sqrt", "knn-quarter", "gumbel", "sampled-grad"])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (as in efficiency.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = [512, 1024, 2048], 1
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = [row for n in args.n for row in measure(n, args.configs, args.d, args.repeats, args.seed, args.device)]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "knn_efficiency_paper.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print("| n | config | exact (s) | knn (s) | exact / knn | exact peak (MiB) | knn peak (MiB) | rel. err | "
          "search (s) | evaluations / query |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ev = f"{r['evaluations_per_query']:.0f}" if r["evaluations_per_query"] != "" else "-"
        print(f"| {r['n']} | {r['config']} | {r['exact_s']:.4f} | {r['knn_s']:.4f} | {r['speedup']:.3f} | "
              f"{r['exact_peak_mib']:.1f} | {r['knn_peak_mib']:.1f} | {100 * r['rel_fro']:.1f}% | "
              f"{r['search_s']:.4f} | {ev} |")
    png = plot(rows, args.configs, args.out / "knn_efficiency_paper.png")
    print(f"wrote {png} and {args.out / 'knn_efficiency_paper.csv'}")
    return rows


if __name__ == "__main__":
    main()
