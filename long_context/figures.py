"""Figures of the long-context evaluation (issue 14), drawn from its CSV rows (:mod:`long_context.evaluation`):

- :func:`plot_pareto`: the end-to-end metric against the attention's time, one curve per method through its
  budgets (all layers patched), exact as a star, extra option sets as open squares, the method a model was
  trained with (budget `trained`) as a filled diamond, one panel per (model, n);
- :func:`plot_layers`: the metric against the number of patched layers (first k solid, last k dashed) per method
  at the sweep's budget, 0 layers being exact, one panel per (model, n) that has a sweep.
"""
from __future__ import annotations

import json
from pathlib import Path

from common import plotting

LABELS = {"recall": "recall accuracy", "lm": "perplexity"}


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("metric") is not None]


def _panels(rows):
    return sorted({(r["model"], int(r["n"])) for r in rows}, key=lambda p: (p[0] != "recall", p[0], p[1]))


def plot_pareto(rows: list[dict], path) -> Path | None:
    """Metric vs attention time (log) per method at each budget, all layers patched; None if no row fits."""
    rows = [r for r in _ok(rows) if r["layers"] == "all"]
    panels = _panels(rows)
    if not panels:
        return None
    fig, axes = plotting.new_figure(ncols=min(3, len(panels)), nrows=(len(panels) + 2) // 3)
    flat = axes.ravel()
    for ax, (model, n) in zip(flat, panels):
        cell = [r for r in rows if r["model"] == model and int(r["n"]) == n]
        for name in sorted({r["method"] for r in cell}, key=lambda m: (m != "exact", m)):
            pts = sorted((r["attention_time_s"] * 1e3, r["metric"]) for r in cell
                         if r["method"] == name and r["budget"] not in ("extra", "trained"))
            if pts:
                xs, ys = zip(*pts)
                style = dict(marker="*", markersize=12, linestyle="none") if name == "exact" else dict(marker="o")
                ax.plot(xs, ys, color=plotting.method_color(name), label=name, **style)
            for r in (r for r in cell if r["method"] == name and r["budget"] in ("extra", "trained")):
                options = ", ".join(f"{k}={v}" for k, v in json.loads(r["options"]).items() if k != "seed")
                trained = r["budget"] == "trained"
                ax.plot([r["attention_time_s"] * 1e3], [r["metric"]], marker="D" if trained else "s",
                        markerfacecolor=None if trained else "none", linestyle="none",
                        color=plotting.method_color(name),
                        label=f"{name} ({'trained with it, ' if trained else ''}{options})")
        ax.set_xscale("log")
        ax.set_yscale("log" if model == "lm" else "linear")
        ax.set_xlabel("attention time per forward (ms)")
        ax.set_ylabel(LABELS[model])
        ax.set_title(f"{model}, n = {n:,} ({cell[0]['dtype']}, {cell[0]['device']})", fontsize=9)
        ax.legend()
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return plotting.save_figure(fig, path)


def plot_layers(rows: list[dict], path) -> Path | None:
    """Metric vs the number of patched layers per method (first k solid, last k dashed); None without a sweep."""
    rows = _ok(rows)
    swept = {(r["model"], int(r["n"])) for r in rows if r["layers"].startswith(("first:", "last:"))}
    panels = [p for p in _panels(rows) if p in swept]
    if not panels:
        return None
    fig, axes = plotting.new_figure(ncols=len(panels))
    for ax, (model, n) in zip(axes.ravel(), panels):
        cell = [r for r in rows if r["model"] == model and int(r["n"]) == n]
        exact = next((r["metric"] for r in cell if r["method"] == "exact"), None)
        sweep = [r for r in cell if r["layers"].startswith(("first:", "last:"))]
        n_layer = max(int(r["patched_layers"]) for r in cell)
        for name in sorted({r["method"] for r in sweep}):
            budget = next(r["budget"] for r in sweep if r["method"] == name)
            full = next((r["metric"] for r in cell if r["method"] == name and r["layers"] == "all"
                         and r["budget"] == budget), None)
            for where, style in (("first", "-"), ("last", "--")):
                pts = {int(r["patched_layers"]): r["metric"] for r in sweep
                       if r["method"] == name and r["layers"].startswith(where + ":")}
                if exact is not None:
                    pts[0] = exact
                if full is not None:
                    pts[n_layer] = full
                ks = sorted(pts)
                ax.plot(ks, [pts[k] for k in ks], style, marker="o", markersize=3, color=plotting.method_color(name),
                        label=f"{name} ({where} k)")
        if exact is not None:
            ax.axhline(exact, color="black", linewidth=0.8)
            if model == "lm":
                ax.axhline(1.05 * exact, color="black", linewidth=0.8, linestyle=":", label="exact + 5%")
        ax.set_yscale("log" if model == "lm" else "linear")
        ax.set_xticks(range(n_layer + 1))
        ax.set_xlabel("patched layers (first k solid, last k dashed)")
        ax.set_ylabel(LABELS[model])
        ax.set_title(f"{model}, n = {n:,}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    return plotting.save_figure(fig, path)
