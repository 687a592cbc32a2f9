"""SRF and Performer against exact attention on a GPU, one CSV: every linear-attention core and feature kernel.

For each n (B = 1, H = 8, D = 64, m = 64, ``--dtype`` bfloat16 by default), in the same run:
- exact attention, ``scaled_dot_product_attention`` in the same dtype (the baseline of every ratio);
- ``srf`` and ``performer`` (registered methods, ``check_finite=False`` as SDPA checks nothing) with each core
  (``attn_fn``: 'torch', 'fla', and our Triton kernel 'flash' at the smallest n only) and each feature map
  (``feature_kernel``: 'torch', 'triton');
- the pieces of srf's causal pass alone, forward and forward + backward: query + key features (each feature
  kernel), the core (each), the normaliser, so that the bottleneck shows;
timed as causal forward, causal forward + backward and non-causal forward (medians of ``--repeats`` after one
warm-up; the first call, compilation and autotuning included, is reported as ``first_call_s``); n is measured in
the order given, 131,072 second by default, and rows are sorted by n in the CSV. At the smallest n,
on clustered inputs (``common.data``), each output's relative Frobenius error against exact attention in float32 and
its relative difference from the PyTorch path (srf, 'torch' core and features) are reported beside the time.

A variant that cannot run here (no CUDA, fla or Triton not installed) gets a row whose ``note`` says why; runs past
``--time-budget`` seconds are skipped with a note. On a CPU: ``--device cpu --quick`` (n = 256, 512) runs in seconds.

    python -m srf_attention.gpu_check --out OUT/srf_gpu.csv [--lengths 16384 65536 131072 262144] [--time-budget 150]
"""
from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import torch

import common
from common.bench import time_callable
from common.cli import script_parser, write_table
from common.data import synthetic_qkv
from common.gpu_benchmark import device_name, failure_message
from common.linear_attention import (augment_values, chunk_linear_attention, fla_chunk_linear_attention, normaliser)

B, H, D, M = 1, 8, 64, 64
LENGTHS = (16384, 131072, 65536, 262144)  # in this order, so that a spent time budget skips the least needed
# (method, attn_fn, feature_kernel); 'flash' (our Triton kernel) only at the smallest n: it is 4-8x slower causally
VARIANTS = [("srf", "torch", "torch"), ("srf", "fla", "torch"), ("srf", "torch", "triton"), ("srf", "fla", "triton"),
            ("performer", "torch", "torch"), ("performer", "fla", "triton")]
SMALLEST_ONLY = [("srf", "flash", "torch")]
PASSES = (("causal", "fwd"), ("causal", "fwd+bwd"), ("non-causal", "fwd"))
COLUMNS = ["n", "mask", "pass", "method", "attn_fn", "feature_kernel", "part", "time_ms", "exact_ms",
           "exact_over_time", "first_call_s", "rel_err_vs_exact_fp32", "rel_diff_vs_torch_path", "note", "device",
           "dtype", "versions"]


def _versions() -> str:
    found = [f"torch {torch.__version__}"]
    for package in ("triton", "fla-core"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} absent")
    return ", ".join(found)


class Clock:
    """The time budget: ``left()`` is False once ``budget_s`` seconds have passed since the start."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.budget_s


def _timed(fn, device, repeats: int) -> tuple[float, float]:
    """(first call in s, median of ``repeats`` later calls in ms)."""
    start = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    return first, 1e3 * time_callable(fn, warmup=1, repeats=repeats, device=device).median_s


def _calls(attend, q, k, v, mask: str, kind: str):
    causal = mask == "causal"
    if kind == "fwd":
        def fwd():
            with torch.no_grad():
                return attend(q, k, v, causal)
        return fwd
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def train():
        attend(*ins, causal).sum().backward()
        for t in ins:
            t.grad = None
    return train


def _sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _method(name, attn_fn, feature_kernel, seed):
    module = common.get_attention(name, nb_features=M, attn_fn=attn_fn, feature_kernel=feature_kernel, seed=seed,
                                  check_finite=False)
    return lambda q, k, v, causal: module(q, k, v, causal=causal)


def _parts(n, device, dtype, seed):
    """The pieces of srf's causal pass: {(attn_fn, feature_kernel, part): (function, its inputs)}. The PyTorch core
    runs on values with a column of ones (numerator and normaliser at once); fla's core gives the numerator, the
    normaliser is its own piece."""
    from .fast_attention import FastAttention

    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    parts = {}
    for feature_kernel in ("torch", "triton"):
        fast = FastAttention(D, M, causal=True, seed=seed, feature_kernel=feature_kernel).to(device)
        parts[("-", feature_kernel, "features")] = (
            lambda q, k, fast=fast: (fast.query_features(q, D ** -0.5), fast.key_features(k, D ** -0.5)[0]), (q, k))
    fast = FastAttention(D, M, causal=True, seed=seed).to(device)
    with torch.no_grad():
        qf, kf = fast.query_features(q, D ** -0.5), fast.key_features(k, D ** -0.5)[0]
    parts[("torch", "-", "core")] = (lambda qf, kf, v: chunk_linear_attention(qf, kf, augment_values(v), True)[0],
                                     (qf, kf, v))
    parts[("fla", "-", "core")] = (lambda qf, kf, v: fla_chunk_linear_attention(qf, kf, v, True)[0], (qf, kf, v))
    parts[("fla", "-", "normaliser")] = (lambda qf, kf: normaliser(qf, kf, True), (qf, kf))
    return parts


def _part_call(fn, ins, kind: str):
    """A callable running ``fn`` forward (no graph), or forward and backward of the sum of its outputs."""
    if kind == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*ins)
        return fwd
    leaves = [t.detach().clone().requires_grad_() for t in ins]

    def train():
        outs = fn(*leaves)
        sum(o.float().sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
        for t in leaves:
            t.grad = None
    return train


def _row(n, mask, kind, method, attn_fn, feature_kernel, part, device, dtype, **values):
    row = dict(n=n, mask=mask, method=method, attn_fn=attn_fn, feature_kernel=feature_kernel, part=part,
               device=device, dtype=str(dtype).removeprefix("torch."), **values)
    row["pass"] = kind
    return row


def _measure(fn, device, repeats, clock):
    """{'first_call_s', 'time_ms'} or {'note'} (skipped for time, or the error that refused the variant)."""
    if not clock.left():
        return {"note": "skipped: time budget"}
    try:
        first, ms = _timed(fn, device, repeats)
    except Exception as error:  # noqa: BLE001  (a check reports every failure in its row and goes on)
        return {"note": f"unavailable: {failure_message(error)}"}
    return {"first_call_s": round(first, 3), "time_ms": round(ms, 4)}


def _errors(variants, device, dtype, n, seed) -> dict:
    """At n: {variant: (rel. error vs exact float32, rel. difference from srf's torch path)} on clustered inputs."""
    x = synthetic_qkv("clustered", B, H, n, n, D, seed=seed, device=device)
    out = {}
    for mask in ("causal", "non-causal"):
        causal = mask == "causal"
        with torch.no_grad():
            truth = _sdpa(x.q, x.k, x.v, causal)
            q, k, v = (t.to(dtype) for t in (x.q, x.k, x.v))
            results = {("exact", "-", "-"): _sdpa(q, k, v, causal)}
            for variant in variants:
                try:
                    results[variant] = _method(*variant, seed)(q, k, v, causal)
                except Exception:  # noqa: BLE001  (its timing row says why)
                    continue
        torch_path = results.get(("srf", "torch", "torch"))
        for variant, o in results.items():
            err = ((o.float() - truth).norm() / truth.norm()).item()
            diff = None if torch_path is None or variant[0] != "srf" else \
                ((o.float() - torch_path.float()).norm() / torch_path.float().norm()).item()
            out[(mask, variant)] = (err, diff)
    return out


def run(lengths=LENGTHS, *, device="cuda", dtype=torch.bfloat16, repeats=5, time_budget_s=150.0, seed=0,
        path: Path | None = None) -> list[dict]:
    """Every row of the CSV (see the module docstring), sorted by n; written to ``path`` (if given) after each n,
    so that a run cut short keeps what it measured."""
    clock = Clock(time_budget_s)
    gpu = device_name(device)
    versions = _versions()
    rows = []
    for n in lengths:
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        variants = VARIANTS + (SMALLEST_ONLY if n == min(lengths) else [])
        for mask, kind in PASSES:
            exact = _measure(_calls(_sdpa, q, k, v, mask, kind), device, repeats, clock)
            rows.append(_row(n, mask, kind, "exact", "-", "-", "all", gpu, dtype,
                             exact_ms=exact.get("time_ms"), **exact))
            for variant in variants:
                result = _measure(_calls(_method(*variant, seed), q, k, v, mask, kind), device, repeats, clock)
                ratio = exact["time_ms"] / result["time_ms"] if "time_ms" in result and "time_ms" in exact else None
                rows.append(_row(n, mask, kind, *variant, "all", gpu, dtype, exact_ms=exact.get("time_ms"),
                                 exact_over_time=None if ratio is None else round(ratio, 3), **result))
        del q, k, v
        if n == min(lengths):  # after the first timings, so that first_call_s holds compilation and autotuning
            errors = _errors(variants, device, dtype, n, seed)
            for row in rows:
                if row["part"] == "all":
                    variant = ("exact", "-", "-") if row["method"] == "exact" else \
                        (row["method"], row["attn_fn"], row["feature_kernel"])
                    row["rel_err_vs_exact_fp32"], row["rel_diff_vs_torch_path"] = \
                        errors.get((row["mask"], variant), (None, None))
        for (attn_fn, feature_kernel, part), (fn, ins) in _parts(n, device, dtype, seed).items():
            for kind in ("fwd", "fwd+bwd"):
                rows.append(_row(n, "causal", kind, "srf", attn_fn, feature_kernel, part, gpu, dtype,
                                 **_measure(_part_call(fn, ins, kind), device, repeats, clock)))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        for row in rows:
            row["versions"] = versions
        rows.sort(key=lambda row: row["n"])
        if path is not None:
            write_csv(rows, path)
    return rows


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, COLUMNS)


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__.split("\n")[0], quick_help="n = 256 and 512, 2 repeats (a CPU check)",
                           with_out=False)
    parser.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("out/srf_gpu.csv"),
                        help="the CSV file (a folder gets srf_gpu.csv inside it)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=150.0, help="seconds; later measurements are skipped")
    args = parser.parse_args(argv)
    lengths, repeats = ([256, 512], 2) if args.quick else (args.lengths, args.repeats)
    path = args.out / "srf_gpu.csv" if args.out.suffix != ".csv" else args.out
    rows = run(lengths, device=args.device, dtype=getattr(torch, args.dtype), repeats=repeats,
               time_budget_s=args.time_budget, seed=args.seed, path=path)
    print(f"{len(rows)} rows -> {path}")
    print("| n | mask | pass | method | attn_fn | features | part | ms | exact ms | exact / time | rel. err | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) if r.get(c) is not None else "" for c in
                                ("n", "mask", "pass", "method", "attn_fn", "feature_kernel", "part", "time_ms",
                                 "exact_ms", "exact_over_time", "rel_err_vs_exact_fp32", "note")) + " |")
    return rows


if __name__ == "__main__":
    main()
