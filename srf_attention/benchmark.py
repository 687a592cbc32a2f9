"""Benchmark of SRF attention against exact causal attention: training step and generation, on this machine.

Two measurements (Reid et al. 2023 use SimRFs inside Performers, at the same linear cost as ORFs):

1. Causal forward + backward (``mode='train'``, chunked prefix sums) vs ``exact`` (PyTorch's
   scaled_dot_product_attention with is_causal=True): median wall time and peak memory over sequence lengths L.
   Exact attention costs O(L^2 D) time; SRF O(L m (D + Dv)).
2. Generation after a context of L tokens: the size of the decoding state (SRF: kv, denominator, key_maxima,
   constant in L; exact: the KV cache, 2 L D numbers) and the median time of one decoding step.

Times are medians of ``--repeats`` runs after one warm-up; peak memory is the rise of the process's peak resident
set (``common.bench.peak_memory_bytes``). The CPU is shared: run it under ``flock /tmp/bench.lock``.

    flock /tmp/bench.lock .venv/bin/python -m srf_attention.benchmark --quick
    flock /tmp/bench.lock .venv/bin/python -m srf_attention.benchmark      # L = 1k .. 16k, writes assets/srf_benchmark.*
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import plotting
from common.bench import peak_memory_bytes, time_callable
from common.cli import script_parser
from common.data import synthetic_qkv

METHODS = ("exact", "srf")


def train_step(attn, q, k, v, grad_out):
    """One causal forward and backward through ``attn``; the gradients are left on q, k, v."""
    for t in (q, k, v):
        t.grad = None
    attn(q, k, v, causal=True).backward(grad_out)


def bench_train(name: str, length: int, args) -> dict:
    x = synthetic_qkv("gaussian", 1, args.heads, length, length, args.head_dim, seed=args.seed, device=args.device)
    q, k, v = (t.requires_grad_() for t in (x.q, x.k, x.v))
    grad_out = torch.randn_like(x.v)
    options = {"nb_features": args.nb_features, "seed": args.seed} if name == "srf" else {}
    attn = common.get_attention(name, **options)
    call = lambda: train_step(attn, q, k, v, grad_out)
    timing = time_callable(call, warmup=1, repeats=args.repeats, device=args.device)
    _, memory = peak_memory_bytes(call, args.device)
    return dict(part="train", method=name, L=length, time_s=timing.median_s, peak_mem_bytes=memory)


def bench_generation(name: str, length: int, args) -> dict:
    """Decoding state after a context of ``length`` tokens, and the time of the next token's step."""
    x = synthetic_qkv("gaussian", 1, args.heads, length + 1, length + 1, args.head_dim, seed=args.seed,
                      device=args.device)
    options = {"nb_features": args.nb_features, "seed": args.seed} if name == "srf" else {}
    attn = common.get_attention(name, **options)
    context = slice(0, length)
    with torch.no_grad():
        state = attn.init_state()
        attn.step(x.q[:, :, context], x.k[:, :, context], x.v[:, :, context], state)
        tensors = [state.kv, state.denominator, state.key_maxima] if name == "srf" else [state.keys, state.values]
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        new = (x.q[:, :, length:], x.k[:, :, length:], x.v[:, :, length:])

        def one_step():
            fresh = attn.init_state()  # steps from a copy, so the measured state does not grow
            if name == "srf":
                fresh.kv, fresh.denominator, fresh.key_maxima = state.kv, state.denominator, state.key_maxima
            else:
                fresh.keys, fresh.values = state.keys, state.values
            attn.step(*new, fresh)

        timing = time_callable(one_step, warmup=1, repeats=args.repeats, device=args.device)
    return dict(part="generation", method=name, L=length, time_s=timing.median_s, state_bytes=state_bytes)


def plot(rows: list[dict], args, path: Path) -> Path:
    fig, axes = plotting.new_figure(ncols=3, width=4.6)
    panels = [("train", "time_s", "causal fwd + bwd time (s)"), ("train", "peak_mem_bytes", "peak memory rise (MiB)"),
              ("generation", "state_bytes", "decoding state (KiB)")]
    for ax, (part, key, label) in zip(axes[0], panels):
        for name in METHODS:
            sel = sorted((r for r in rows if r["part"] == part and r["method"] == name and r.get(key) is not None),
                         key=lambda r: r["L"])
            scale = {"time_s": 1.0, "peak_mem_bytes": 2.0 ** -20, "state_bytes": 2.0 ** -10}[key]
            ax.plot([r["L"] for r in sel], [r[key] * scale for r in sel], marker="o", ms=3,
                    color=plotting.method_color(name),
                    label=name if name == "exact" else f"srf (m = {args.nb_features})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    axes[0][0].set_title(f"training step, H = {args.heads}, D = {args.head_dim}")
    axes[0][1].set_title("training step memory")
    axes[0][2].set_title("generation after L tokens")
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__.split("\n")[0],
                           quick_help="L = 256 .. 1024, one repeat: seconds",
                           out_help="folder for srf_benchmark.csv / .png")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.repeats = [256, 512, 1024], 1
    rows = []
    grid = [(part, name, length) for part in ("train", "generation") for length in args.lengths for name in METHODS]
    for part, name, length in tqdm(grid, desc="benchmark"):
        rows.append((bench_train if part == "train" else bench_generation)(name, length, args))
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["part", "method", "L", "time_s", "peak_mem_bytes", "state_bytes"]
    with (args.out / "srf_benchmark.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    path = plot(rows, args, args.out / "srf_benchmark.png")
    mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:.1f}"
    print(f"\ncausal forward+backward, B=1, H={args.heads}, D={args.head_dim}, m={args.nb_features}, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| L | exact (s) | srf (s) | exact / srf | exact peak MiB | srf peak MiB |\n|---|---|---|---|---|---|")
    for length in args.lengths:
        e, s = ({r["method"]: r for r in rows if r["part"] == "train" and r["L"] == length}[n] for n in METHODS)
        print(f"| {length} | {e['time_s']:.4f} | {s['time_s']:.4f} | {e['time_s'] / s['time_s']:.1f} "
              f"| {mib(e['peak_mem_bytes'])} | {mib(s['peak_mem_bytes'])} |")
    print("\ngeneration: state after L tokens and one decoding step")
    print("| L | exact KV cache KiB | srf state KiB | exact step (ms) | srf step (ms) |\n|---|---|---|---|---|")
    for length in args.lengths:
        e, s = ({r["method"]: r for r in rows if r["part"] == "generation" and r["L"] == length}[n] for n in METHODS)
        print(f"| {length} | {e['state_bytes'] / 1024:.0f} | {s['state_bytes'] / 1024:.1f} "
              f"| {1e3 * e['time_s']:.2f} | {1e3 * s['time_s']:.2f} |")
    print(f"wrote {path} and {args.out / 'srf_benchmark.csv'}")
    return rows


if __name__ == "__main__":
    main()
