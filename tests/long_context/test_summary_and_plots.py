"""The answers to issue 14's questions computed from evaluation rows, and the figures drawn from a CSV."""
from long_context import plot as plot_script
from long_context.evaluation import fast_and_accurate, layers_within, write_csv


def row(model, method, layers, patched, change, speedup=1.0, budget="mid", n=4096, status="ok"):
    exact = 0.9 if model == "recall" else 4.0
    metric = None if change is None else exact + change if model == "recall" else exact * (1 + change)
    return dict(model=model, n=n, dtype="bfloat16", method=method, budget=budget, options="{}", layers=layers,
                patched_layers=patched, status=status, message="", metric_name="m", metric=metric,
                exact_metric=exact, metric_change=change, attention_time_s=1e-3 / speedup,
                exact_attention_time_s=1e-3, attention_speedup=speedup, forward_time_s=2e-3,
                exact_forward_time_s=2e-3, forward_speedup=1.0, sequences=4, scored=32, device="cpu", torch="x")


def lm_rows():
    return [row("lm", "exact", "all", 4, 0.0, budget="exact"),
            # a: first 1, 2 fine, 3 too much; last k fine up to all four layers
            row("lm", "a", "all", 4, 0.04), row("lm", "a", "first:1", 1, 0.01), row("lm", "a", "first:2", 2, 0.03),
            row("lm", "a", "first:3", 3, 0.06), row("lm", "a", "last:1", 1, 0.0), row("lm", "a", "last:2", 2, 0.01),
            row("lm", "a", "last:3", 3, 0.02),
            # b: fails at one layer already from the front; its last:2 failed to run (not counted past it)
            row("lm", "b", "all", 4, 0.5), row("lm", "b", "first:1", 1, 0.2), row("lm", "b", "first:2", 2, 0.3),
            row("lm", "b", "first:3", 3, 0.4), row("lm", "b", "last:1", 1, 0.01),
            row("lm", "b", "last:2", 2, None, status="error"), row("lm", "b", "last:3", 3, 0.02)]


def test_layers_within_counts_consecutive_patches_within_tolerance():
    assert layers_within(lm_rows(), "lm", 4096, 0.05) == {
        "a": {"budget": "mid", "n_layer": 4, "first": 2, "last": 4},
        "b": {"budget": "mid", "n_layer": 4, "first": 0, "last": 1}}


def test_fast_and_accurate_needs_both_accuracy_and_speed():
    rows = [row("recall", "exact", "all", 2, 0.0, budget="exact"),
            row("recall", "fast_bad", "all", 2, -0.05, speedup=3.0),
            row("recall", "slow_good", "all", 2, -0.01, speedup=1.5),
            row("recall", "both", "all", 2, -0.015, speedup=2.5),
            row("recall", "both", "first:1", 1, 0.0, speedup=9.0),   # one layer only: not the question
            row("recall", "both", "all", 2, 0.0, speedup=2.5, n=1024)]
    assert [r["method"] for r in fast_and_accurate(rows, "recall", 4096, 0.02, 2.0)] == ["both"]


def test_plot_writes_both_figures_and_the_summary(tmp_path, capsys):
    csv_path = write_csv(lm_rows(), tmp_path / "eval.csv")
    written = plot_script.main(["--csv", str(csv_path), "--out", str(tmp_path)])
    assert [p.name for p in written] == ["long_context_pareto.png", "long_context_layers.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    assert "lm n=4096: layers patched before perplexity +5% (first k / last k of 4): a 2/4, b 0/1" in \
        capsys.readouterr().out
