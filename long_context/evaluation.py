"""End-to-end evaluation with each attention method swapped into a trained long-context model (issue 14).

For each model (``recall``: accuracy on multi-query associative recall; ``lm``: perplexity of the character
model on the validation text), each sequence length n, each causal method at each of its declared budgets
(``common.budget_options``: low, mid, high), and each choice of layers (all, or ``first:k`` / ``last:k`` / a
list), one row: the metric beside the metric of exact attention on the same sequences, and the time of a whole
forward and of the attention alone (the sum over the layers of the method's calls, measured by hooks around each
layer's attention module: CUDA events on a GPU, ``time.perf_counter`` on the CPU), each the median over the
evaluation's batches after one untimed warm-up forward, and their ratios to exact's in the same run.

Every method sees the same seeded sequences (a paired comparison: the difference of two methods' accuracies is
much less noisy than either). The models run under bfloat16 autocast for ``dtype='bfloat16'`` (q, k, v reach the
method in bfloat16; exact is then SDPA's flash kernel on a GPU).

A model trained with a method (``long_context.train_recall`` / ``train_lm`` ``--attention``) is also evaluated with
the method and options it was trained with (budget label ``trained``), beside exact attention (always the first row
at each n) and the budgets asked for.

A row that fails (an error, out of memory, longer than ``row_time_limit``) is recorded with its status and
message and the run goes on; once ``time_budget`` is spent, the rows not started are recorded as skipped. The
CSV is rewritten after every row, so a run stopped from outside keeps what it measured.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common.cli import write_table
from common.gpu_benchmark import chosen_budgets, device_name, failure_message, failure_status, time_limit
from nanoGPT.data_loader import get_batch, load_split
from nanoGPT.model import GPT, select_layers

from .recall import IGNORE_INDEX, RecallTask, recall_batch
from .training import autocast_context, reseed_attention

BUDGET_LABELS = ("low", "mid", "high")
METRICS = {"recall": "accuracy", "lm": "perplexity"}
CSV_FIELDS = ["model", "checkpoint", "n", "dtype", "method", "budget", "options", "layers", "patched_layers", "status", "message",
              "metric_name", "metric", "exact_metric", "metric_change", "attention_time_s",
              "exact_attention_time_s", "attention_speedup", "forward_time_s", "exact_forward_time_s",
              "forward_speedup", "sequences", "scored", "device", "torch"]


def labelled_budgets(name: str, n: int, seed: int, labels=BUDGET_LABELS) -> list[tuple[str, dict]]:
    """(label, options) of the budgets ``name`` declares at n (``common.gpu_benchmark.chosen_budgets``: 'low' the
    first, 'mid' the middle, 'high' the last), each option set once; ``exact`` has the one label 'exact'."""
    if name == "exact":
        return [("exact", {})]
    chosen: list[tuple[str, dict]] = []
    for label in labels:
        if label not in BUDGET_LABELS:
            raise ValueError(f"budget labels must be among {BUDGET_LABELS}, got {label!r}")
        for picked in chosen_budgets(name, n, seed, label):
            if all(picked[1] != options for _, options in chosen):
                chosen.append(picked)
    return chosen


def make_batches(kind: str, n: int, batches: int, batch_size: int, seed: int, task: RecallTask | None = None,
                 device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation's (tokens, targets) batches at length n, seeded: recall sequences of ``task`` at length n
    (targets IGNORE_INDEX except at the queries), or windows of the validation text (targets the next characters)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "recall":
        return [recall_batch(task.with_length(n), batch_size, generator, device) for _ in range(batches)]
    if kind == "lm":
        data = load_split("val")
        return [get_batch(data, batch_size, n, generator, device) for _ in range(batches)]
    raise ValueError(f"make_batches: kind must be one of {tuple(METRICS)}, got {kind!r}")


def trained_attention(model: GPT) -> tuple[str, dict] | None:
    """(name, options) of the method a loaded model was trained with (its config records it: the same in every
    layer), or None for an exact-trained model."""
    if model.config.layer_attention is not None:
        raise ValueError("trained_attention: the model's layers run different methods; a trained model runs one")
    if model.config.attention == "exact":
        return None
    return model.config.attention, dict(model.config.attention_options)


class AttentionTimer:
    """Times each layer's attention calls during a forward: ``with timer: model(x)``, then ``timer.seconds()``
    is the sum over the layers of this forward. CUDA events on a GPU (no synchronisation inside the forward),
    perf_counter on the CPU. The hooks sit on the modules present when the timer is entered."""

    def __init__(self, model: GPT):
        self.model, self.handles, self.spans = model, [], []
        self.cuda = next(model.parameters()).device.type == "cuda"

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self):
        self.spans = []
        for block in self.model.blocks:
            attention = block.attn.attention
            self.handles.append(attention.register_forward_pre_hook(lambda m, a: self.spans.append([self._now()])))
            self.handles.append(attention.register_forward_hook(lambda m, a, o: self.spans[-1].append(self._now())))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        return sum(end - start for start, end in self.spans)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: GPT, kind: str, batches: list, dtype: str = "float32") -> dict:
    """Run ``model`` over ``batches`` (one untimed warm-up forward on the first, then every batch timed):
    {'metric', 'scored', 'forward_time_s', 'attention_time_s'} (times: medians over the batches). A randomised
    method's streams restart from their seeds after the warm-up, so the metric is the one a freshly loaded model
    gets (and a model trained with the method reproduces the accuracy its training recorded)."""
    device = next(model.parameters()).device
    with autocast_context(device, dtype):
        model(batches[0][0])  # warm-up: index building, kernel selection, compilation
    reseed_attention(model)
    forward_times, attention_times = [], []
    correct = nll = 0.0
    scored = 0
    for tokens, targets in batches:
        _sync(device)
        start = time.perf_counter()
        with AttentionTimer(model) as timer, autocast_context(device, dtype):
            logits, _ = model(tokens)
        _sync(device)
        forward_times.append(time.perf_counter() - start)
        attention_times.append(timer.seconds())
        mask = targets != IGNORE_INDEX
        logits, targets = logits[mask].float(), targets[mask]
        correct += (logits.argmax(-1) == targets).sum().item()
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        scored += targets.numel()
    metric = correct / scored if kind == "recall" else math.exp(nll / scored)
    return {"metric": metric, "scored": scored, "forward_time_s": statistics.median(forward_times),
            "attention_time_s": statistics.median(attention_times)}


@dataclass
class Cell:
    """One row to run: a method at a budget in the layers named."""
    method: str
    budget: str
    options: dict
    layers: str  # 'all', 'first:k', 'last:k' or a comma-separated list of indices


def layer_spec(layers: str):
    """The ``layers`` argument of GPT.set_attention for a cell's layer string."""
    if layers in ("all", None) or layers.startswith(("first:", "last:")):
        return None if layers in ("all", None) else layers
    try:
        return [int(i) for i in layers.split(",")]
    except ValueError:
        raise ValueError(f"layers: expected 'all', 'first:k', 'last:k' or comma-separated indices, got {layers!r}") \
            from None


def plan_cells(methods, n: int, n_layer: int, seed: int, budgets=BUDGET_LABELS, layers: str = "all",
               sweep: tuple = (), sweep_budget: str = "mid", extra: tuple = (), trained: tuple | None = None) -> list[Cell]:
    """The cells at one n: ``trained`` (the (name, options) a model was trained with, labelled 'trained', options
    as recorded) in ``layers``; every method at each budget in ``layers``; then the ``extra`` (name, options) pairs
    (option sets beyond the declared budgets, labelled 'extra', seeded like them) in ``layers``; then
    (``sweep``: 'first' and/or 'last') every method at ``sweep_budget`` in the first / last k layers for
    k = 1 .. n_layer - 1 (k = n_layer is the all-layers row). ``exact`` is not a cell: it is every cell's
    reference."""
    cells = [] if trained is None else [Cell(trained[0], "trained", dict(trained[1]), layers)]
    for name in methods:
        if name != "exact":
            cells += [Cell(name, label, options, layers) for label, options in labelled_budgets(name, n, seed, budgets)]
    cells += [Cell(name, "extra", common.method_options(name, options, seed), layers) for name, options in extra]
    for where in sweep:
        if where not in ("first", "last"):
            raise ValueError(f"sweep: expected 'first' and/or 'last', got {where!r}")
        for name in methods:
            if name == "exact":
                continue
            (label, options), = labelled_budgets(name, n, seed, (sweep_budget,))
            cells += [Cell(name, label, options, f"{where}:{k}") for k in range(1, n_layer)]
    return cells


def write_csv(rows: list[dict], path) -> Path:
    """The rows as a CSV with this table's columns (:func:`common.cli.write_table`)."""
    return write_table(rows, path, CSV_FIELDS)


def read_csv(path) -> list[dict]:
    """The rows of an evaluation CSV, numbers as floats (empty cells None)."""
    numeric = {"n", "patched_layers", "metric", "exact_metric", "metric_change", "attention_time_s",
               "exact_attention_time_s", "attention_speedup", "forward_time_s", "exact_forward_time_s",
               "forward_speedup", "sequences", "scored"}
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in numeric & set(row):
            row[key] = float(row[key]) if row[key] not in ("", None) else None
    return rows


def evaluate_model(model: GPT, kind: str, task: RecallTask | None, ns, methods=None, *, budgets=BUDGET_LABELS,
                   layers: str = "all", sweep: tuple = (), sweep_n: int | None = None, sweep_budget: str = "mid",
                   extra: tuple = (), trained: tuple | None = None, checkpoint: str = "",
                   batches: int = 4, batch_size: int = 8, seed: int = 0, dtype: str = "float32",
                   row_time_limit: float = 0.0, deadline: float | None = None, rows: list | None = None,
                   csv_path=None, progress=None) -> list[dict]:
    """Run every cell at each n (the layer sweep at ``sweep_n``, the largest n by default) and return the rows
    (appended to ``rows`` if given; the CSV rewritten after each when ``csv_path``); the model's layers run
    again what they ran before when it returns. ``deadline``: a
    ``time.perf_counter()`` value after which the cells not started are recorded as skipped. ``trained``: the
    (name, options) the model was trained with (:func:`trained_attention`), a row at each n; ``checkpoint``: the
    file's name, written in every row."""
    if kind not in METRICS:
        raise ValueError(f"evaluate_model: kind must be one of {tuple(METRICS)}, got {kind!r}")
    methods = list(methods or common.methods(causal=True))
    refused = [m for m in methods if m not in common.methods(causal=True)]
    if refused:
        raise ValueError(f"evaluate_model: methods {refused} cannot run in a GPT (not causal or unknown); "
                         f"causal methods: {common.methods(causal=True)}")
    rows = [] if rows is None else rows
    device = next(model.parameters()).device
    base = dict(model=kind, checkpoint=checkpoint, dtype=dtype, metric_name=METRICS[kind], device=device_name(device),
                torch=torch.__version__)
    sweep_n = max(ns) if sweep_n is None else sweep_n
    n_layer = model.config.n_layer
    before = [model.config.attention_of_layer(i) for i in range(n_layer)]
    for n in ns:
        if kind == "lm" and model.config.position_embedding == "learned" and n > model.config.block_size:
            raise ValueError(f"evaluate_model: n={n} exceeds the LM's block_size={model.config.block_size}")
        data = make_batches(kind, n, batches, batch_size, seed, task, device)
        cells = plan_cells(methods, n, n_layer, seed, budgets, layers, sweep if n == sweep_n else (), sweep_budget,
                           extra, trained)
        model.set_attention("exact")
        reference = None
        for cell in [Cell("exact", "exact", {}, "all")] + cells:
            row = dict(base, n=n, method=cell.method, budget=cell.budget, options=json.dumps(cell.options),
                       layers=cell.layers, sequences=batches * batch_size)
            try:
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError("skipped: the run's time budget was spent")
                if cell.method != "exact" and reference is None:
                    raise RuntimeError("skipped: no exact reference at this n")
                model.set_attention("exact")
                spec = layer_spec(cell.layers)
                model.set_attention(cell.method, layers=spec, **cell.options)
                row["patched_layers"] = len(select_layers(spec, n_layer))
                with time_limit(row_time_limit):
                    result = measure(model, kind, data, dtype)
                if reference is None:
                    reference = result
                row.update(status="ok", metric=result["metric"], scored=result["scored"],
                           forward_time_s=result["forward_time_s"], attention_time_s=result["attention_time_s"],
                           exact_metric=reference["metric"],
                           exact_forward_time_s=reference["forward_time_s"],
                           exact_attention_time_s=reference["attention_time_s"],
                           forward_speedup=reference["forward_time_s"] / result["forward_time_s"],
                           attention_speedup=reference["attention_time_s"] / result["attention_time_s"])
                row["metric_change"] = (result["metric"] - reference["metric"] if kind == "recall"
                                        else result["metric"] / reference["metric"] - 1.0)
            except Exception as err:  # noqa: BLE001 -- a failing method is a row (its status and message), not the end of the run
                skipped = str(err).startswith("skipped")
                row.update(status="skipped" if skipped else failure_status(err),
                           message=str(err).removeprefix("skipped: ") if skipped else failure_message(err))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if csv_path is not None:
                write_csv(rows, csv_path)
            if progress is not None:
                progress(row)
    for i, (name, options) in enumerate(before):  # each layer runs again what it ran before (fresh streams)
        model.set_attention(name, layers=[i], **options)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: metric (change to exact) and attention / forward speed-ups."""
    lines = ["| model | n | method | budget | layers | metric | exact | change | attn time (ms) | attn speed-up | "
             "fwd speed-up | status |", "|" + "---|" * 12]
    for r in rows:
        fmt = lambda x, spec: "" if x in (None, "") else format(float(x), spec)
        change = r.get("metric_change")
        change = "" if change in (None, "") else (f"{100 * float(change):+.1f} pts" if r["model"] == "recall"
                                                  else f"{100 * float(change):+.1f}%")
        attn = r.get("attention_time_s")
        budget = r["budget"] if r["budget"] != "extra" else f"extra {r['options']}"
        lines.append(f"| {r['model']} | {int(float(r['n']))} | {r['method']} | {budget} | {r['layers']} | "
                     f"{fmt(r.get('metric'), '.4g')} | {fmt(r.get('exact_metric'), '.4g')} | {change} | "
                     f"{'' if attn in (None, '') else format(1e3 * float(attn), '.2f')} | "
                     f"{fmt(r.get('attention_speedup'), '.2f')} | {fmt(r.get('forward_speedup'), '.2f')} | "
                     f"{r['status']}{': ' + r['message'][:60] if r.get('message') else ''} |")
    return "\n".join(lines)


def layers_within(rows: list[dict], model: str, n: int, tolerance: float) -> dict:
    """Per method (at the sweep's budget): the largest k such that patching the first k layers, and the largest
    k for the last k layers, keeps ``metric_change`` within ``tolerance`` (perplexity: relative rise <= tolerance;
    accuracy: drop <= tolerance), counting only k whose smaller patches all stay within it too."""
    ok = [r for r in rows if r["status"] == "ok" and r["model"] == model and int(float(r["n"])) == n]
    within = lambda r: (float(r["metric_change"]) <= tolerance if model == "lm"
                        else float(r["metric_change"]) >= -tolerance)
    result = {}
    for name in sorted({r["method"] for r in ok if str(r["layers"]).startswith(("first:", "last:"))}):
        budget = next(r["budget"] for r in ok if r["method"] == name and str(r["layers"]).startswith("first:"))
        rows_of = [r for r in ok if r["method"] == name and r["budget"] == budget]
        n_layer = max(int(float(r["patched_layers"])) for r in rows_of)
        counts = {}
        for where in ("first", "last"):
            by_k = {int(float(r["patched_layers"])): r for r in rows_of if r["layers"].startswith(where + ":")}
            by_k.update({n_layer: r for r in rows_of if r["layers"] == "all"})
            k = 0
            while k + 1 in by_k and within(by_k[k + 1]):
                k += 1
            counts[where] = k
        result[name] = {"budget": budget, "n_layer": n_layer, **counts}
    return result


def fast_and_accurate(rows: list[dict], model: str, n: int, max_drop: float, min_speedup: float) -> list[dict]:
    """The all-layer rows at (model, n) whose metric stays within ``max_drop`` of exact (accuracy points / 100, or
    relative perplexity rise) while the attention is at least ``min_speedup`` times faster than exact's."""
    out = []
    for r in rows:
        if r["status"] != "ok" or r["model"] != model or int(float(r["n"])) != n or r["layers"] != "all" \
                or r["method"] == "exact":
            continue
        change = float(r["metric_change"])
        if (change >= -max_drop if model == "recall" else change <= max_drop) and \
                float(r["attention_speedup"]) >= min_speedup:
            out.append(r)
    return out
