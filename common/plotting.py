"""One figure style for the whole repository: same colours per method, labelled axes, PNG under assets/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: scripts, tests and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .data import REPO_ROOT  # noqa: E402

ASSETS = REPO_ROOT / "assets"

METHOD_COLORS = {
    "exact": "#000000", "uniform": "#7f7f7f", "knn": "#1f77b4", "kdeformer": "#d62728", "performer": "#2ca02c",
    "reformer": "#9467bd", "sblocal": "#8c564b", "srf": "#ff7f0e", "tree": "#e377c2",
}
_FALLBACK = ["#17becf", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39"]


def method_color(name: str) -> str:
    """The colour of a method in every figure (stable across figures and runs)."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return _FALLBACK[sum(map(ord, name)) % len(_FALLBACK)]


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
