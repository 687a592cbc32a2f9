"""Timing and memory of attention methods, and the helper that runs many methods on one input.

Times are medians of several runs after warm-up, with CUDA synchronisation when the tensors live on a GPU.
Peak memory is the CUDA allocator's maximum on GPU; on CPU it is the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs on Linux), which includes allocator noise of a few MiB.
Speed ratios are always taken against ``exact`` measured in the same run, on the same input.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import metrics
from .attention import attention_weights
from .registry import get_attention


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    times_s: list[float] = field(default_factory=list)


MAX_REPEATS = 1000  # the bound of ``min_time_s``'s repetitions


def time_within(fn, *, repeats: int, deadline: float, device="cpu"):
    """``(output of the first call, Timing of the timed calls)``: the first call is the warm-up (its output is
    kept, e.g. to score it); then up to ``repeats`` timed calls, as many as fit before ``deadline`` (a
    ``time.perf_counter`` value) judging by the first call's time, at least one."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - start
    fitting = int((deadline - time.perf_counter()) / max(first, 1e-9))
    return out, time_callable(fn, warmup=0, repeats=max(1, min(repeats, fitting)), device=device)


def time_callable(fn, *, warmup: int = 1, repeats: int = 5, device="cpu", min_time_s: float = 0.0) -> Timing:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed, and further timed calls while they add
    up to less than ``min_time_s`` seconds (at most ``MAX_REPEATS`` in all); return the median and all times."""
    if repeats < 1 or warmup < 0 or min_time_s < 0:
        raise ValueError(f"time_callable: repeats must be >= 1, warmup >= 0 and min_time_s >= 0, got {repeats}, "
                         f"{warmup}, {min_time_s}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    while len(times) < repeats or (sum(times) < min_time_s and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), times)


def _read_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so that re-using them shows up as growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(fn, device="cpu") -> tuple[object, int | None]:
    """Run ``fn()`` once; return (its result, the peak memory it added in bytes, or None if unmeasurable)."""
    if torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return fn(), None
    before = _read_status_kib("VmRSS")
    result = fn()
    after = _read_status_kib("VmHWM")
    if before is None or after is None:
        return result, None
    return result, max(0, after - before) * 1024


KL_MAX_ENTRIES = 2 ** 28  # the KL needs both B x H x Nq x Nk attention matrices; beyond this size it is skipped


def evaluate_methods(methods: list[tuple[str, dict]], q, k, v, *, causal: bool = False, scale=None,
                     repeats: int = 3, warmup: int = 1, min_time_s: float = 0.0, measure_memory: bool = True,
                     time_fp32_exact: bool = False, on_row=None) -> list[dict]:
    """Run each (name, options) on one input; return one row per method.

    Row keys: method, options, time_s (median, :func:`time_callable`), ratio_to_exact (time / the time of
    ``exact`` in the inputs' dtype, in this run), exact_fp32_time_s (exact's time on a float32 copy of the inputs
    if ``time_fp32_exact``, else None), rel_fro, rel_spec, max_abs (output errors vs exact attention, computed in
    float32 for half-precision inputs, so that exact's own row shows the dtype's rounding), kl (of attention rows,
    when the method exposes ``attention_matrix`` and the matrices hold at most ``KL_MAX_ENTRIES`` entries, else
    None), peak_mem_bytes. ``exact`` is always run first as the reference.
    ``on_row(row)`` is called after each row (e.g. to advance a progress bar).
    """
    device = q.device
    exact = get_attention("exact")
    half = q.dtype in (torch.float16, torch.bfloat16)
    timed = lambda fn, warm: time_callable(fn, warmup=warm, repeats=repeats, device=device,
                                           min_time_s=min_time_s).median_s
    with torch.no_grad():
        # the reference: exact attention in the inputs' dtype, or in float32 (on the same values) for half inputs
        qr, kr, vr = (t.float() for t in (q, k, v)) if half else (q, k, v)
        reference = exact(qr, kr, vr, causal=causal, scale=scale) if half else None
        fp32_time = None
        if time_fp32_exact and q.dtype != torch.float32:
            q32, k32, v32 = (t.float() for t in (q, k, v))
            fp32_time = timed(lambda: exact(q32, k32, v32, causal=causal, scale=scale), warmup)
        exact_time = None
        exact_weights = None
        rows = []
        for name, options in [("exact", {})] + [m for m in methods if m[0] != "exact"]:
            attn = get_attention(name, **options).to(device)
            call = lambda: attn(q, k, v, causal=causal, scale=scale)
            # The first call (scored, its memory measured) is also the first of the ``warmup`` untimed calls.
            out, mem = peak_memory_bytes(call, device) if measure_memory else (call(), None)
            timing = timed(call, max(0, warmup - 1))
            if name == "exact":
                exact_time = timing
                reference = out if reference is None else reference
                fp32_time = timing if time_fp32_exact and q.dtype == torch.float32 else fp32_time
            kl = None
            small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= KL_MAX_ENTRIES
            if hasattr(attn, "attention_matrix") and small:
                if exact_weights is None:
                    exact_weights = attention_weights(qr, kr, causal=causal, scale=scale)
                kl = metrics.kl_divergence_rows(exact_weights, attn.attention_matrix(q, k, causal=causal, scale=scale))
            rows.append(dict(method=name, options=options, time_s=timing, ratio_to_exact=timing / exact_time,
                             exact_fp32_time_s=fp32_time,
                             rel_fro=metrics.relative_frobenius_error(out, reference),
                             rel_spec=metrics.relative_spectral_error(out, reference),
                             max_abs=metrics.max_abs_error(out, reference), kl=kl, peak_mem_bytes=mem))
            if on_row is not None:
                on_row(rows[-1])
    return rows
