"""Inputs shared by every experiment: GloVe-format word vectors, synthetic q/k/v, and the registry of input
sources the comparisons draw from.

The synthetic generators make inputs whose structure is known, so tests can state what a method must do:
- ``gaussian``: i.i.d. N(0, 1) entries;
- ``clustered``: keys (and queries) drawn around a few random centres, as real attention keys often are;
- ``planted``: one key per query is a scaled copy of that query, so it is the arg-max of its row;
- every kind takes ``sharpness``: queries are multiplied by it, so the softmax is peaked (> 1) or flat (< 1).

Input sources. A comparison asks for inputs by name: ``make_input("clustered", n, InputSpec(...))``. The sources
``gaussian``, ``clustered`` (synthetic) and ``glove`` (a word-vector file, ``InputSpec.path``) are registered here;
any other is registered by the package that owns its data, with :func:`register_source`, in a module named
``qkv_source.py`` at the top of that package. ``common`` names no such package: on first use of the registry,
:func:`input_sources` imports every ``<package>/qkv_source.py`` found beside ``common/`` in the repository (for
example the GPT package registers ``shakespeare``, real q/k/v of a model trained on tiny Shakespeare). A source is
a function ``source(n, spec) -> QKV``; a script can also register its own before running a comparison.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .attention import causal_query_positions

REPO_ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC_KINDS = ("gaussian", "clustered", "planted")
SOURCE_MODULE = "qkv_source"  # <package>/qkv_source.py registers that package's input sources


def load_glove(path: str | Path, max_words: int | None = None,
               dtype: torch.dtype = torch.float64) -> tuple[list[str], torch.Tensor]:
    """Read word vectors in GloVe text format: one ``word v1 v2 ... vd`` per line.

    An optional word2vec-style header ``<count> <dim>`` on the first line is recognised and checked. Every
    line must have the same dimension; a malformed line raises a ValueError naming its line number.
    Returns (words, vectors of shape (n_words, d)).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_glove: no file at {path}")
    if max_words is not None and max_words < 1:
        raise ValueError(f"load_glove: max_words must be >= 1 or None, got {max_words}")
    words, rows, dim, header_count = [], [], None, None
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                header_count, dim = int(parts[0]), int(parts[1])
                continue
            if not parts or parts == [""]:
                raise ValueError(f"load_glove: {path}:{line_no}: empty line")
            word, values = parts[0], parts[1:]
            if dim is None:
                dim = len(values)
                if dim == 0:
                    raise ValueError(f"load_glove: {path}:{line_no}: word {word!r} has no vector")
            if len(values) != dim:
                raise ValueError(f"load_glove: {path}:{line_no}: expected {dim} values after the word, "
                                 f"got {len(values)}")
            try:
                rows.append([float(x) for x in values])
            except ValueError as err:
                raise ValueError(f"load_glove: {path}:{line_no}: not a number ({err})") from None
            words.append(word)
            if max_words is not None and len(words) >= max_words:
                break
    if not words:
        raise ValueError(f"load_glove: {path} holds no vectors")
    if header_count is not None and max_words is None and header_count != len(words):
        raise ValueError(f"load_glove: header of {path} announces {header_count} words, found {len(words)}")
    return words, torch.tensor(rows, dtype=dtype)


@dataclass
class QKV:
    """A batch of attention inputs with a name saying where it came from."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    source: str


def synthetic_qkv(kind: str, batch: int = 1, heads: int = 1, n_queries: int = 256, n_keys: int | None = None,
                  head_dim: int = 64, value_dim: int | None = None, sharpness: float = 1.0, seed: int = 0,
                  n_clusters: int = 16, cluster_spread: float = 0.3, planted_scale: float = 3.0,
                  dtype: torch.dtype = torch.float32, device="cpu") -> QKV:
    """Synthetic q, k, v of shapes (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv); see the module docstring.

    For ``planted``, key ``planted_index(i)`` = ``planted_scale * sqrt(D) * q_i / |q_i|`` for query i (queries
    unit-norm times sqrt(D)), so q_i . k_planted = planted_scale * D is far above q_i . k_j ~ sqrt(D) for
    random keys; needs Nk >= Nq.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"synthetic_qkv: unknown kind {kind!r}; expected one of {SYNTHETIC_KINDS}")
    n_keys = n_queries if n_keys is None else n_keys
    value_dim = head_dim if value_dim is None else value_dim
    for name, val in (("batch", batch), ("heads", heads), ("n_queries", n_queries), ("n_keys", n_keys),
                      ("head_dim", head_dim), ("value_dim", value_dim)):
        if val < 1:
            raise ValueError(f"synthetic_qkv: {name} must be >= 1, got {val}")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    if kind == "gaussian":
        q, k = randn(*shape, n_queries, head_dim), randn(*shape, n_keys, head_dim)
    elif kind == "clustered":
        if n_clusters < 1:
            raise ValueError(f"synthetic_qkv: n_clusters must be >= 1, got {n_clusters}")
        centres = randn(*shape, n_clusters, head_dim)
        pick_k = torch.randint(n_clusters, (*shape, n_keys), generator=gen)
        pick_q = torch.randint(n_clusters, (*shape, n_queries), generator=gen)
        gather = lambda idx: torch.gather(centres, 2, idx.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        k = gather(pick_k) + cluster_spread * randn(*shape, n_keys, head_dim)
        q = gather(pick_q) + cluster_spread * randn(*shape, n_queries, head_dim)
    else:
        if n_keys < n_queries:
            raise ValueError(f"synthetic_qkv: planted needs n_keys >= n_queries, got {n_keys} < {n_queries}")
        q = randn(*shape, n_queries, head_dim)
        q = q / q.norm(dim=-1, keepdim=True) * head_dim ** 0.5
        k = randn(*shape, n_keys, head_dim)
        k[:, :, planted_indices(n_queries, n_keys)] = planted_scale * q
    v = randn(*shape, n_keys, value_dim)
    q = q * sharpness
    return QKV(q.to(dtype=dtype, device=device), k.to(dtype=dtype, device=device),
               v.to(dtype=dtype, device=device), source=f"{kind}(sharpness={sharpness}, seed={seed})")


def planted_indices(n_queries: int, n_keys: int) -> torch.Tensor:
    """Index of the planted key of each query: query i's own causal position i + (Nk - Nq), so that the
    planted key is visible under causal attention too."""
    return causal_query_positions(n_queries, n_keys)


@dataclass(frozen=True)
class InputSpec:
    """What a comparison asks of an input source besides its length n; each source uses the fields it needs."""
    heads: int = 4                      # heads of the synthetic inputs (a real source has its model's)
    head_dim: int = 64                  # head dimension of the synthetic inputs
    seed: int = 0                       # seed of the synthetic draws
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    quick: bool = False                 # prefer the cheapest real data (e.g. a small committed model)
    progress: bool = True               # a source that prepares data (trains a model) may show progress
    path: Path | None = None            # a file the source reads (``glove``)


@dataclass(frozen=True)
class InputSource:
    name: str
    make: Callable[[int, InputSpec], QKV]
    in_default: bool                    # part of a comparison's default inputs (needs nothing from the user)


_SOURCES: dict[str, InputSource] = {}
_plugins_loaded = False


def register_source(name: str, make: Callable[[int, InputSpec], QKV] | None = None, *, in_default: bool = True):
    """Register ``make(n, spec) -> QKV`` as the input source ``name`` (also usable as a decorator).

    Registering the same function again (a module imported twice, e.g. run as a script) is a no-op; another
    function under a taken name is a ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_source: name must be a non-empty string, got {name!r}")

    def decorator(fn):
        known = _SOURCES.get(name)
        same = known is not None and known.make.__qualname__ == fn.__qualname__ and \
            fn.__module__ in (known.make.__module__, "__main__")
        if known is not None and not same:
            raise ValueError(f"register_source: the input {name!r} is already taken by {known.make.__qualname__}")
        _SOURCES[name] = InputSource(name, fn, in_default)
        return fn

    return decorator if make is None else decorator(make)


def _load_source_plugins() -> None:
    """Import ``<package>/qkv_source.py`` of every package beside ``common`` (see the module docstring)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in sorted(REPO_ROOT.glob(f"*/{SOURCE_MODULE}.py")):
        if (module.parent / "__init__.py").is_file():
            importlib.import_module(f"{module.parent.name}.{SOURCE_MODULE}")


def input_sources(default_only: bool = False) -> list[str]:
    """Names of the registered input sources, sorted; ``default_only``: those a comparison runs by default."""
    _load_source_plugins()
    return sorted(name for name, src in _SOURCES.items() if src.in_default or not default_only)


def make_input(name: str, n: int, spec: InputSpec = InputSpec()) -> QKV:
    """The input ``name`` at length n: q, k, v of shapes (B, H, n, D), (B, H, n, D), (B, H, n, Dv)."""
    _load_source_plugins()
    if name not in _SOURCES:
        raise ValueError(f"make_input: unknown input {name!r}; registered: {', '.join(input_sources())}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"make_input: n must be a positive int, got {n!r}")
    return _SOURCES[name].make(n, spec)


def _synthetic_source(kind: str):
    def make(n: int, spec: InputSpec) -> QKV:
        return synthetic_qkv(kind, 1, spec.heads, n, n, spec.head_dim, seed=spec.seed, dtype=spec.dtype,
                             device=spec.device)
    make.__qualname__ = f"synthetic_source_{kind}"
    return make


for _kind in ("gaussian", "clustered"):
    register_source(_kind, _synthetic_source(_kind))


@register_source("glove", in_default=False)
def glove_qkv(n: int, spec: InputSpec) -> QKV:
    """q = k = the first n word vectors of ``spec.path``, v = the next n (KDEformer, Sec. 5.1 uses GloVe so)."""
    if spec.path is None:
        raise ValueError("glove: this input needs a GloVe-format text file (InputSpec.path, --glove PATH)")
    _, vectors = load_glove(spec.path, max_words=2 * n)
    if vectors.shape[0] < 2 * n:
        raise ValueError(f"glove: {spec.path} holds {vectors.shape[0]} vectors, need 2n = {2 * n}")
    as_input = lambda x: x.reshape(1, 1, n, -1).to(dtype=spec.dtype, device=spec.device)
    return QKV(as_input(vectors[:n]), as_input(vectors[:n]).clone(), as_input(vectors[n:2 * n]),
               source=str(spec.path))
