"""One figure style for the whole repository: one colour per method, labelled axes, PNG under assets/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: scripts, tests and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .data import REPO_ROOT  # noqa: E402
from .registry import methods  # noqa: E402

ASSETS = REPO_ROOT / "assets"

# Colour i goes to the i-th registered method (``common.methods()``: exact first, in black, then by name), so a
# method keeps its colour in every figure and run; names outside the registry take one from the second list.
PALETTE = ["#000000", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#e377c2", "#7f7f7f",
           "#17becf", "#bcbd22", "#393b79"]
_OTHER = ["#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d"]


def method_color(name: str) -> str:
    """The colour of a registered method (or any other curve label) in every figure, stable across runs."""
    names = methods()
    if name in names and names.index(name) < len(PALETTE):
        return PALETTE[names.index(name)]
    return _OTHER[sum(map(ord, name)) % len(_OTHER)]


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    """A figure with the repository's style; returns (fig, axes) like ``plt.subplots``."""
    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG (150 dpi, tight box, parent folders created) and close it; return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure: figures are PNG, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
