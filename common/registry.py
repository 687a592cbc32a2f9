"""The method registry: every attention method is reachable by name (docs/DESIGN.md, "The one contract").

    @register("knn")
    class KNNAttention(AttentionMethod): ...

    attn = get_attention("knn", k=32, seed=0)   # an nn.Module: attn(q, k, v, causal=False, scale=None)
    available()                                 # ['exact', 'kdeformer', 'knn', ...]
    methods(causal=True, trainable=True)        # the names that can train a GPT
    budget_options("knn", 1024, seed=0)         # the option sets a comparison runs, seeded where randomised

The method packages register themselves when imported; the registry imports them on first use, so that
``common`` alone is enough to reach every method.
"""
from __future__ import annotations

import importlib

_REGISTRY: dict[str, type] = {}

# Packages whose import registers methods. Order is the order of `available()` ties; names sort anyway.
METHOD_PACKAGES = ("common.baselines", "knn_attention", "kdeformer", "srf_attention", "tree_attention")
_loaded = False


def register(name: str):
    """Class decorator: make an ``AttentionMethod`` subclass reachable as ``get_attention(name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")

    def decorator(cls):
        known = _REGISTRY.get(name)
        if known is not None and cls.__module__ == "__main__" and known.__qualname__ == cls.__qualname__:
            cls.name = name  # a registering module run as a script (python -m): its package copy stays registered
            return cls
        if known is not None and known is not cls:
            raise ValueError(f"register: the name {name!r} is already taken by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_method_packages() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in METHOD_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            importlib.import_module(package)


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_method_packages()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The registered class of ``name``; unknown names raise a ValueError listing the known ones."""
    _load_method_packages()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_attention(name: str, **options):
    """Build the method ``name`` with ``options``; an unknown option raises a ValueError naming it."""
    cls = method_class(name)
    accepted = cls.option_names()
    unknown = [o for o in options if o not in accepted]
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(accepted) or '(none)'}")
    return cls(**options)


def methods(causal: bool = False, trainable: bool = False) -> list[str]:
    """Registered names, ``exact`` first, restricted to those that can run ``causal=True`` (if ``causal``) and
    that have gradients (if ``trainable``). The one place that answers "which methods can do X"."""
    names = [n for n in available()
             if (not causal or method_class(n).supports_causal) and (not trainable or method_class(n).trainable)]
    return sorted(names, key=lambda n: (n != "exact", n))


def method_options(name: str, options: dict | None = None, seed: int | None = None) -> dict:
    """``options`` for ``name``, with ``seed`` added when the method is randomised and no seed was given, so
    that a run repeats exactly; a deterministic method gets no seed."""
    options = dict(options or {})
    if method_class(name).randomized and options.get("seed") is None and seed is not None:
        options["seed"] = seed
    return options


def budget_options(name: str, n_keys: int, seed: int | None = None) -> list[dict]:
    """The option sets of increasing work that ``name`` declares for ``n_keys`` keys (``budgets``), each
    through :func:`method_options`."""
    return [method_options(name, budget, seed) for budget in method_class(name).budgets(n_keys)]
