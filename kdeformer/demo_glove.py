"""KDEformer's GloVe experiment (Zandieh et al. 2023, Sec. 5.1, Fig. 3): error vs budget of four approximations.

Q = K = word vectors scaled by 10^(-1/4), V = other word vectors (the next n words), batch of 8 disjoint windows,
one head, attention scale 1, float64. For each budget num_feats f:
Reformer (bucket_size f/2), Performer (f features), ScatterBrain (local f/2 + f features), KDEformer (r = 7,
bucket_size f/2, sample_size f). Reported: the mean over the batch of the relative spectral-norm error of the
output and the median time, printed as a table and drawn in ``assets/kdeformer_glove.png``.

Data: ``--glove PATH`` (GloVe text format, e.g. glove.6B.100d.txt, needs 2 n batch words). Without it (no GloVe
file ships with the repository) the script says so and uses a STAND-IN, labelled as such everywhere:
``--standin shakespeare`` (default): real key and value vectors of the last layer, head 0, of the small nanoGPT
model trained on tiny Shakespeare (``common.compare.shakespeare_qkv``; d = 32), or ``--standin clustered``:
clustered synthetic vectors (d = 100; what ``--quick`` uses, so that it needs no trained model).

    python -m kdeformer.demo_glove --quick
    python -m kdeformer.demo_glove --n 8192 --glove glove.6B.100d.txt
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm import tqdm

from common import get_attention, plotting
from common.bench import time_callable
from common.cli import script_parser
from common.compare import shakespeare_qkv
from common.data import load_glove, synthetic_qkv
from common.metrics import relative_spectral_error

METHODS = {
    "reformer": lambda f: {"bucket_size": max(1, f // 2)},
    "performer": lambda f: {"nb_features": f},
    "sblocal": lambda f: {"local_size": max(1, f // 2), "nb_features": f},
    "kdeformer": lambda f: {"num_bits": 7, "bucket_size": max(1, f // 2), "sample_size": f},
}


def load_inputs(glove: Path | None, n: int, batch: int, seed: int, standin: str = "shakespeare"):
    """(q, k, v, description): (batch, 1, n, d) float64 each; q = k = 10^(-1/4) X."""
    if glove is not None:
        _, vectors = load_glove(glove, max_words=2 * n * batch)
        if vectors.shape[0] < 2 * n * batch:
            raise ValueError(f"demo_glove: {glove} has {vectors.shape[0]} words, need 2 * n * batch = {2 * n * batch}")
        x = vectors[: n * batch].view(batch, 1, n, -1)
        v = vectors[n * batch: 2 * n * batch].view(batch, 1, n, -1)
        source = f"GloVe ({glove.name})"
    elif standin == "shakespeare":
        print("WARNING: no --glove file given (none ships with the repository): using a STAND-IN, the keys and "
              "values of the small nanoGPT model on tiny Shakespeare. These are not GloVe results.")
        data = shakespeare_qkv(n * batch, dtype=torch.float64)
        x = data.k[0, 0].reshape(batch, 1, n, -1)
        v = data.v[0, 0].reshape(batch, 1, n, -1)
        source = "stand-in: nanoGPT Shakespeare keys/values (not GloVe)"
    else:
        print("WARNING: no --glove file given (none ships with the repository): using a STAND-IN of clustered "
              "synthetic vectors, d = 100. These are not GloVe results.")
        data = synthetic_qkv("clustered", batch, 1, n, n, 100, seed=seed, dtype=torch.float64)
        x, v = data.k, data.v
        source = "stand-in: clustered synthetic vectors (not GloVe)"
    qk = x * 10 ** -0.25
    return qk, qk.clone(), v, source


def run(q, k, v, budgets, repeats: int, seed: int, progress: bool = True) -> list[dict]:
    exact = get_attention("exact")
    with torch.no_grad():
        reference = exact(q, k, v, scale=1.0)
        t_exact = time_callable(lambda: exact(q, k, v, scale=1.0), warmup=0, repeats=repeats).median_s
        rows = [dict(method="exact", num_feats=0, rel_spec_err=0.0, time_s=t_exact, ratio_to_exact=1.0)]
        for f in tqdm(budgets, desc="budgets", disable=not progress):
            for name, options in METHODS.items():
                attn = get_attention(name, seed=seed, **options(f))
                out = attn(q, k, v, scale=1.0)
                errs = [relative_spectral_error(out[b], reference[b]) for b in range(q.shape[0])]
                t = time_callable(lambda: attn(q, k, v, scale=1.0), warmup=0, repeats=repeats).median_s
                rows.append(dict(method=name, num_feats=f, rel_spec_err=sum(errs) / len(errs), time_s=t,
                                 ratio_to_exact=t / t_exact))
    return rows


def plot(rows: list[dict], source: str, n: int, path: Path) -> Path:
    fig, axes = plotting.new_figure(ncols=2)
    budget_ax, time_ax = axes[0]
    for name in METHODS:
        sel = [r for r in rows if r["method"] == name]
        kw = dict(color=plotting.method_color(name), label=name, marker="o")
        budget_ax.plot([r["num_feats"] for r in sel], [r["rel_spec_err"] for r in sel], **kw)
        time_ax.plot([r["time_s"] for r in sel], [r["rel_spec_err"] for r in sel], **kw)
    t_exact = next(r["time_s"] for r in rows if r["method"] == "exact")
    time_ax.axvline(t_exact, color="black", ls="--", lw=0.8, label="exact attention time")
    budget_ax.set_xscale("log", base=2)
    budget_ax.set_xlabel("budget num_feats (features / samples / 2 x bucket size)")
    time_ax.set_xscale("log")
    time_ax.set_xlabel("median time per call (s), shared 2-core CPU")
    for ax in (budget_ax, time_ax):
        ax.set_yscale("log")
        ax.set_ylabel("relative spectral error of output")
        ax.legend()
    budget_ax.set_title(f"{source}, n = {n}", fontsize=9)
    return plotting.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = script_parser("KDEformer's GloVe experiment (error vs budget and time).",
                           quick_help="n = 512, batch 2, budgets 32 and 128, clustered stand-in, one run")
    parser.add_argument("--glove", type=Path, default=None, help="GloVe-format text file")
    parser.add_argument("--standin", choices=["shakespeare", "clustered"], default="shakespeare",
                        help="data when no --glove is given (--quick uses clustered)")
    parser.add_argument("--n", type=int, default=8192, help="sequence length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch, args.budgets, args.repeats, args.standin = 512, 2, [32, 128], 1, "clustered"
    q, k, v, source = load_inputs(args.glove, args.n, args.batch, args.seed, args.standin)
    q, k, v = (t.to(args.device) for t in (q, k, v))
    rows = run(q, k, v, args.budgets, args.repeats, args.seed)
    print(f"data: {source}; n = {args.n}, batch = {args.batch}, float64, {args.device} (shared CPU: times are medians "
          f"of {args.repeats} runs, ratio against exact in the same run)")
    print("| method | num_feats | rel. spectral error | time (s) | time / exact |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['num_feats']} | {r['rel_spec_err']:.4f} | {r['time_s']:.4f} | {r['ratio_to_exact']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kdeformer_glove.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["data", "n", "batch", *rows[0]])
        writer.writeheader()
        writer.writerows({"data": source, "n": args.n, "batch": args.batch, **r} for r in rows)
    print(f"wrote {plot(rows, source, args.n, args.out / 'kdeformer_glove.png')}")
    return rows


if __name__ == "__main__":
    main()
