"""Every notebook runs top to bottom in quick mode without a cell error (nbclient), figures into a temp folder;
every figure it writes is a readable image and every table a CSV with a header and rows."""
import csv

import matplotlib.image
import pytest

from notebooks.run_all import execute_notebook, notebook_names


def test_all_six_notebooks_exist():
    assert set(notebook_names()) == {"knn_attention", "kdeformer", "srf_attention", "tree_attention", "nanogpt",
                                     "comparison"}


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs_in_quick_mode(name, tmp_path):
    execute_notebook(name, quick=True, out=tmp_path, timeout_s=600)
    figures = sorted(tmp_path.rglob("*.png"))
    assert figures, f"notebook {name} wrote no figure"
    for path in figures:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) >= 100, f"{path.name}: {image.shape}"
        assert image.std() > 0, f"{path.name} is blank"
    for path in sorted(tmp_path.rglob("*.csv")):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        assert reader.fieldnames and all(reader.fieldnames), f"{path.name}: bad header {reader.fieldnames}"
        assert rows and all(len(r) == len(reader.fieldnames) and None not in r for r in rows), path.name
