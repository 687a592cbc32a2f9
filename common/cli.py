"""The command line every experiment script shares (DESIGN.md, "Conventions").

Each script of the four papers takes ``--seed``, ``--device``, ``--quick`` (a size that finishes in seconds on a
laptop CPU) and ``--out`` (the folder for its figure and table, ``assets/`` by default); :func:`script_parser`
makes a parser that already has them, and the script adds its own options; :func:`write_table` writes their CSVs.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .plotting import ASSETS


def script_parser(description: str, *, quick_help: str, device_help: str = "torch device (cpu, cuda, cuda:1, ...)",
                  out_help: str = "folder for the figure and the table", with_out: bool = True
                  ) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared options; ``with_out=False`` for a script that writes no file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw, so a run repeats exactly")
    parser.add_argument("--device", default="cpu", help=device_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if with_out:
        parser.add_argument("--out", type=Path, default=ASSETS, help=out_help)
    return parser


def write_table(rows: list[dict], path, fields: list[str]) -> Path:
    """Write ``rows`` as a CSV with the columns ``fields`` (a missing value is an empty cell, keys not in ``fields``
    are left out, dicts and lists are written as JSON) through a temporary file, so that a run stopped mid-write
    never leaves a half-written table; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    tmp.replace(path)
    return path
