"""The experiments of KDEformer's paper as library functions; ``demo_glove.py`` and ``benchmark.py`` are thin
``main()``s over them.

- :func:`load_inputs`: the GloVe experiment's input (Zandieh et al. 2023, Sec. 5.1): Q = K = word vectors scaled by
  10^(-1/4), V = the next n word vectors, a batch of disjoint windows, one head, float64; or a labelled stand-in
  when no GloVe file is given (real nanoGPT Shakespeare keys/values, or clustered synthetic vectors).
- :data:`GLOVE_METHODS`, :func:`glove_rows`, :func:`plot_glove`: error vs budget of KDEformer and its baselines
  (Fig. 3). Reformer runs with 8 hashing rounds as in the original demo, plus a 1-round row.
- :data:`STAGES`, :func:`speed_rows`, :func:`stage_profile`, :func:`plot_speed`: speed-up and error of KDEformer
  against exact attention at one long n, interleaved rounds, and where its time goes.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from common import get_attention, plotting
from common.bench import time_callable
from common.data import load_glove, synthetic_qkv
from common.metrics import relative_spectral_error

# label -> (registered method, options for a budget num_feats f). Reformer as in the original demo (8 hashing
# rounds); the 1-round row is what this repository's demo ran before (issue 16), kept for comparison.
GLOVE_METHODS = {
    "reformer": ("reformer", lambda f: {"bucket_size": max(1, f // 2), "n_hashes": 8}),
    "reformer_1round": ("reformer", lambda f: {"bucket_size": max(1, f // 2), "n_hashes": 1}),
    "performer": ("performer", lambda f: {"nb_features": f}),
    "sblocal": ("sblocal", lambda f: {"local_size": max(1, f // 2), "nb_features": f}),
    "kdeformer": ("kdeformer", lambda f: {"num_bits": 7, "bucket_size": max(1, f // 2), "sample_size": f}),
}
GLOVE_COLUMNS = ["data", "n", "batch", "method", "num_feats", "rel_spec_err", "time_s", "ratio_to_exact"]

STAGES = ("kdeformer.lsh_sort", "kdeformer.residual_sample", "kdeformer.block_attention", "kdeformer.unsort")
SPEED_COLUMNS = ["data", "n", "batch", "num_bits", "causal", "dtype", "method", "bucket_size", "sample_size",
                 "time_s", "speedup", "rel_spec_err", "rel_spec_err_std"]


def load_inputs(glove: Path | None, n: int, batch: int, seed: int, standin: str = "shakespeare"):
    """(q, k, v, description): (batch, 1, n, d) float64 each; q = k = 10^(-1/4) X.

    ``glove``: a GloVe-format text file with at least 2 n batch words. Without it a STAND-IN, said so on stdout
    and in the description: ``shakespeare`` (keys and values of head 0 of the last layer of the quick nanoGPT model,
    ``nanoGPT.qkv_source``; d = 32) or ``clustered`` (synthetic, d = 100; needs no trained model)."""
    if glove is not None:
        _, vectors = load_glove(glove, max_words=2 * n * batch)
        if vectors.shape[0] < 2 * n * batch:
            raise ValueError(f"load_inputs: {glove} has {vectors.shape[0]} words, need 2 * n * batch = {2 * n * batch}")
        x = vectors[: n * batch].view(batch, 1, n, -1)
        v = vectors[n * batch: 2 * n * batch].view(batch, 1, n, -1)
        source = f"GloVe ({glove.name})"
    elif standin == "shakespeare":
        # imported here: the model side (and its training on first use) is needed only for this stand-in
        from nanoGPT.qkv_source import shakespeare_qkv

        print("WARNING: no --glove file given (none ships with the repository): using a STAND-IN, the keys and "
              "values of the small nanoGPT model on tiny Shakespeare. These are not GloVe results.")
        data = shakespeare_qkv(n * batch, dtype=torch.float64)
        x = data.k[0, 0].reshape(batch, 1, n, -1)
        v = data.v[0, 0].reshape(batch, 1, n, -1)
        source = "stand-in: nanoGPT Shakespeare keys/values (not GloVe)"
    elif standin == "clustered":
        print("WARNING: no --glove file given (none ships with the repository): using a STAND-IN of clustered "
              "synthetic vectors, d = 100. These are not GloVe results.")
        data = synthetic_qkv("clustered", batch, 1, n, n, 100, seed=seed, dtype=torch.float64)
        x, v = data.k, data.v
        source = "stand-in: clustered synthetic vectors (not GloVe)"
    else:
        raise ValueError(f"load_inputs: standin must be 'shakespeare' or 'clustered', got {standin!r}")
    qk = x * 10 ** -0.25
    return qk, qk.clone(), v, source


def glove_rows(q, k, v, budgets, repeats: int, seed: int, progress: bool = True) -> list[dict]:
    """Rows (method, num_feats, rel_spec_err, time_s, ratio_to_exact), exact first, then every budget x
    :data:`GLOVE_METHODS`; error = mean over the batch of the relative spectral error of the output (scale 1)."""
    exact = get_attention("exact")
    with torch.no_grad():
        reference = exact(q, k, v, scale=1.0)
        t_exact = time_callable(lambda: exact(q, k, v, scale=1.0), warmup=0, repeats=repeats).median_s
        rows = [dict(method="exact", num_feats=0, rel_spec_err=0.0, time_s=t_exact, ratio_to_exact=1.0)]
        for f in tqdm(budgets, desc="budgets", disable=not progress):
            for label, (name, options) in GLOVE_METHODS.items():
                attn = get_attention(name, seed=seed, **options(f))
                out = attn(q, k, v, scale=1.0)
                errs = [relative_spectral_error(out[b], reference[b]) for b in range(q.shape[0])]
                t = time_callable(lambda: attn(q, k, v, scale=1.0), warmup=0, repeats=repeats).median_s
                rows.append(dict(method=label, num_feats=f, rel_spec_err=sum(errs) / len(errs), time_s=t,
                                 ratio_to_exact=t / t_exact))
    return rows


def machine_label(device) -> str:
    """Where the times were measured, for the figures: the device and, on a CPU, torch's thread count."""
    return f"{device}, {torch.get_num_threads()} threads" if torch.device(device).type == "cpu" else str(device)


def plot_glove(rows: list[dict], source: str, n: int, path: Path, machine: str = "cpu") -> Path:
    """Error vs budget and error vs time, one curve per row label of :data:`GLOVE_METHODS`; ``machine`` says where
    the times come from (:func:`machine_label`)."""
    fig, axes = plotting.new_figure(ncols=2)
    budget_ax, time_ax = axes[0]
    for label, (name, _) in GLOVE_METHODS.items():
        sel = [r for r in rows if r["method"] == label]
        kw = dict(color=plotting.method_color(name), marker="o", ls="--" if label.endswith("1round") else "-",
                  label={"reformer": "reformer (8 rounds)", "reformer_1round": "reformer (1 round)"}.get(label, label))
        budget_ax.plot([r["num_feats"] for r in sel], [r["rel_spec_err"] for r in sel], **kw)
        time_ax.plot([r["time_s"] for r in sel], [r["rel_spec_err"] for r in sel], **kw)
    t_exact = next(r["time_s"] for r in rows if r["method"] == "exact")
    time_ax.axvline(t_exact, color="black", ls="--", lw=0.8, label="exact attention time")
    budget_ax.set_xscale("log", base=2)
    budget_ax.set_xlabel("budget num_feats (features / samples / 2 x bucket size)")
    time_ax.set_xscale("log")
    time_ax.set_xlabel(f"median time per call (s), {machine}")
    for ax in (budget_ax, time_ax):
        ax.set_yscale("log")
        ax.set_ylabel("relative spectral error of output")
    time_ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: no curve hidden
    budget_ax.set_title(f"{source}, n = {n}", fontsize=9)
    return plotting.save_figure(fig, path)


def _timed_call(fn, device):
    """(seconds, output) of one call of ``fn``."""
    result = {}
    seconds = time_callable(lambda: result.update(out=fn()), warmup=0, repeats=1, device=device).median_s
    return seconds, result["out"]


def speed_rows(q, k, v, configs, num_bits: int, repeats: int, seed: int, causal: bool = False,
               progress: bool = True) -> list[dict]:
    """Rows (exact first, then one per (bucket_size, sample_size) in ``configs``) of interleaved timings and errors
    on one input: each of ``repeats`` rounds times exact and every configuration once, in turn (so load from other
    processes hits all alike), each configuration with a fresh seed. time_s = median, speedup = median exact time /
    median time, rel_spec_err = mean over batch and rounds (± pstdev over rounds)."""
    exact = get_attention("exact")
    methods = {cfg: get_attention("kdeformer", num_bits=num_bits, bucket_size=cfg[0], sample_size=cfg[1],
                                  seed=seed) for cfg in configs}
    times = {cfg: [] for cfg in ["exact", *configs]}
    errors = {cfg: [] for cfg in configs}
    with torch.no_grad():
        reference = exact(q, k, v, causal=causal, scale=1.0)
        for attn in methods.values():  # warm-up (first-call allocations)
            attn(q, k, v, causal=causal, scale=1.0)
        for r in tqdm(range(repeats), desc=f"rounds ({q.dtype})", disable=not progress):
            times["exact"].append(_timed_call(lambda: exact(q, k, v, causal=causal, scale=1.0), q.device)[0])
            for cfg, attn in methods.items():
                attn.reseed(seed + 1 + r)
                seconds, out = _timed_call(lambda: attn(q, k, v, causal=causal, scale=1.0), q.device)
                times[cfg].append(seconds)
                errors[cfg].append(statistics.fmean(relative_spectral_error(out[b], reference[b])
                                                    for b in range(q.shape[0])))
    t_exact = statistics.median(times["exact"])
    common_fields = dict(causal=causal, dtype=str(q.dtype).removeprefix("torch."))
    rows = [dict(common_fields, method="exact", bucket_size="", sample_size="", time_s=t_exact, speedup=1.0,
                 rel_spec_err=0.0, rel_spec_err_std=0.0)]
    for cfg in configs:
        t = statistics.median(times[cfg])
        rows.append(dict(common_fields, method="kdeformer", bucket_size=cfg[0], sample_size=cfg[1], time_s=t,
                         speedup=t_exact / t, rel_spec_err=statistics.fmean(errors[cfg]),
                         rel_spec_err_std=statistics.pstdev(errors[cfg])))
    return rows


def stage_profile(q, k, v, config, num_bits: int, seed: int) -> dict[str, float]:
    """Seconds per labelled stage (:data:`STAGES`) of one non-causal KDEformer call (``torch.profiler``), plus
    'other' and 'total'."""
    attn = get_attention("kdeformer", num_bits=num_bits, bucket_size=config[0], sample_size=config[1], seed=seed)
    with torch.no_grad():
        attn(q, k, v, scale=1.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total, _ = _timed_call(lambda: attn(q, k, v, scale=1.0), q.device)
    stages = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in STAGES}
    stages = {name: stages.get(name, 0.0) for name in STAGES}
    stages["other (validation, bias, ...)"] = total - sum(stages.values())
    stages["total"] = total
    return stages


def plot_speed(rows: list[dict], source: str, n: int, path: Path, machine: str = "cpu") -> Path:
    """Error vs speed-up of every KDEformer configuration, one marker per dtype, the goal region shaded; ``machine``
    says where the times come from (:func:`machine_label`)."""
    fig, axes = plotting.new_figure(width=6.0, height=4.4)
    ax = axes[0][0]
    right = 1.1 * max(r["speedup"] for r in rows)
    ax.fill_between([5, max(right, 6.0)], 0, 0.10, color="green", alpha=0.08, label="goal: >= 5x faster, error < 10%")
    for dtype, marker, offset in (("float32", "o", (5, 4)), ("float64", "s", (5, -10))):
        sel = [r for r in rows if r["dtype"] == dtype and r["method"] == "kdeformer"]
        if not sel:
            continue
        ax.errorbar([r["speedup"] for r in sel], [r["rel_spec_err"] for r in sel],
                    yerr=[r["rel_spec_err_std"] for r in sel], fmt=marker, capsize=2,
                    color=plotting.method_color("kdeformer"), mfc="white" if dtype == "float64" else None,
                    label=f"kdeformer, {dtype} (± std over seeds)")
        for r in sel:
            ax.annotate(f"{r['bucket_size']}:{r['sample_size']}", (r["speedup"], r["rel_spec_err"]),
                        textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("speed-up over exact attention (x, median time, same run)")
    ax.set_ylabel("relative spectral error of output")
    causal = "causal" if rows[0]["causal"] else "non-causal"
    ax.set_title(f"{source}\nn = {n}, {causal}, {machine}; labels bucket_size:sample_size", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # below the axes: it hides no point
    return plotting.save_figure(fig, path)
