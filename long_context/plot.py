"""Draw the long-context figures from evaluation CSVs: ``long_context_pareto.png`` (metric vs attention time per
method, all layers patched) and ``long_context_layers.png`` (metric vs number of patched layers).

    python -m long_context.plot                                        # assets/long_context/long_context_eval.csv
    python -m long_context.plot --csv run/recall/long_context_eval.csv run/lm/long_context_eval.csv --out DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .evaluate import ASSETS, CSV_NAME
from .evaluation import read_csv
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
    return written


if __name__ == "__main__":
    main()
