"""Every notebook runs top to bottom in quick mode without a cell error (nbclient), figures into a temp folder."""
import pytest

from notebooks.run_all import execute_notebook, notebook_names


def test_all_six_notebooks_exist():
    assert set(notebook_names()) == {"knn_attention", "kdeformer", "srf_attention", "tree_attention", "nanogpt",
                                     "comparison"}


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs_in_quick_mode(name, tmp_path):
    execute_notebook(name, quick=True, out=tmp_path, timeout_s=600)
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
