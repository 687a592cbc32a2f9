"""Draw the long-context figures from evaluation CSVs: ``long_context_pareto.png`` (metric vs attention time per
method, all layers patched) and ``long_context_layers.png`` (metric vs number of patched layers), and print the
issue's two questions answered from the rows: which methods stay within 2 points of exact recall accuracy at
>= 2x the attention speed, and how many layers (first k / last k) each method takes before perplexity rises 5%.

    python -m long_context.plot                                        # assets/long_context/long_context_eval.csv
    python -m long_context.plot --csv run/recall/long_context_eval.csv run/lm/long_context_eval.csv --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .evaluate import ASSETS, CSV_NAME
from .evaluation import fast_and_accurate, layers_within, read_csv
from .figures import plot_layers, plot_pareto


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, nargs="+", default=[ASSETS / CSV_NAME], help="evaluation CSVs")
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the figures")
    args = parser.parse_args(argv)
    rows = [row for path in args.csv for row in read_csv(path)]
    written = [p for p in (plot_pareto(rows, args.out / "long_context_pareto.png"),
                           plot_layers(rows, args.out / "long_context_layers.png")) if p is not None]
    for path in written:
        print(f"wrote {path}")
    print(summary(rows))
    return written


def summary(rows: list[dict]) -> str:
    """The goals of issue 14 answered from the rows, as text."""
    lines = []
    for model, n in sorted({(r["model"], int(r["n"])) for r in rows if r["status"] == "ok"}):
        if model == "recall":
            hits = fast_and_accurate(rows, "recall", n, max_drop=0.02, min_speedup=2.0)
            named = ", ".join(f"{r['method']} {r['budget'] if r['budget'] != 'extra' else r['options']} "
                              f"({100 * r['metric_change']:+.1f} pts, "
                              f"{r['attention_speedup']:.2f}x)" for r in hits) or "none"
            lines.append(f"recall n={n}: within 2 points of exact at >= 2x attention speed: {named}")
        swept = layers_within(rows, model, n, 0.05 if model == "lm" else 0.02)
        if swept:
            what = "perplexity +5%" if model == "lm" else "accuracy -2 points"
            lines.append(f"{model} n={n}: layers patched before {what} (first k / last k of "
                         f"{next(iter(swept.values()))['n_layer']}): " +
                         ", ".join(f"{m} {v['first']}/{v['last']}" for m, v in swept.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
