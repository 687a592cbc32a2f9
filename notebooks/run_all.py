"""Execute every notebook headless with nbclient (what ``make figures`` runs).

Each notebook reads two environment variables: ``QUICK=1`` for the seconds-sized settings, and
``FIGURES_OUT`` for where its figures go (default ``assets/``). Notebooks are executed in memory from the repo
root and are not rewritten, so the committed notebooks stay free of large outputs.

    python -m notebooks.run_all                 # full size, figures into assets/
    python -m notebooks.run_all --quick --out /tmp/figs knn_attention
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))


def execute_notebook(name: str, quick: bool, out: Path, timeout_s: int = 3600) -> float:
    """Run notebook ``name`` top to bottom; raise nbclient's CellExecutionError on the first failing cell.

    Returns the wall time in seconds.
    """
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"run_all: no notebook {path}; available: {notebook_names()}")
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in ("QUICK", "FIGURES_OUT", "PYTHONPATH", "MPLBACKEND")}
    os.environ.update(QUICK="1" if quick else "0", FIGURES_OUT=str(out), MPLBACKEND="Agg",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), saved["PYTHONPATH"]])))
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Execute the notebooks headless.")
    parser.add_argument("names", nargs="*", help=f"notebooks to run (default all: {notebook_names()})")
    parser.add_argument("--quick", action="store_true", help="QUICK=1: seconds-sized settings")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets", help="folder for the figures")
    args = parser.parse_args(argv)
    for name in args.names or notebook_names():
        print(f"{name}: {execute_notebook(name, args.quick, args.out.resolve()):.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
