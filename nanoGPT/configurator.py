"""Configuration of the scripts: a dataclass of defaults, then config files, then ``--key=value`` overrides.

    python -m nanoGPT.train config/train_shakespeare_char_cpu.py --attention=srf --max_iters=500

A config file is Python made of plain assignments (``n_layer = 4``); it is executed in an empty namespace and
every public name it defines must be a field of the dataclass. An override's value is read with
``ast.literal_eval`` (numbers, booleans, None, strings, dicts such as ``--attention_options={'k': 32}``) and
falls back to the raw string; either way it must have the type of the field's default. Unknown keys and wrong
types are errors that name the key, so a typo never passes silently.
"""
from __future__ import annotations

import ast
import dataclasses
import types
import typing
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resolve_config_path(path: str) -> Path:
    """A config file as given, or relative to the nanoGPT folder (``config/x.py`` works from the repo root)."""
    for candidate in (Path(path), PACKAGE_DIR / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file {path!r} not found (looked in the current folder and {PACKAGE_DIR})")


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _accepts(annotation, value) -> bool:
    """Whether ``value`` fits the field's annotation (int accepted for float; None for Optional fields)."""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _set(values: dict, types_: dict, key: str, value, source: str) -> None:
    if key not in types_:
        raise ValueError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(types_))}")
    if not _accepts(types_[key], value):
        raise TypeError(f"{source}: {key} must be {types_[key]}, got {value!r} ({type(value).__name__})")
    if isinstance(value, int) and not isinstance(value, bool) and types_[key] is float:
        value = float(value)
    values[key] = value


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(cls, argv: list[str], defaults: dict | None = None):
    """An instance of the dataclass ``cls`` from its defaults, then ``defaults``, then the config files and
    ``--key=value`` overrides in ``argv``, in the order given."""
    types_ = _field_types(cls)
    values: dict = {}
    for key, value in (defaults or {}).items():
        _set(values, types_, key, value, "defaults")
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cls))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"override {arg!r} must look like --key=value")
            _set(values, types_, key, parse_value(text), f"override {arg!r}")
        else:
            path = resolve_config_path(arg)
            namespace: dict = {}
            exec(compile(path.read_text(), str(path), "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    _set(values, types_, key, value, f"config file {path}")
    return cls(**values)


def help_text(cls) -> str:
    lines = [(cls.__doc__ or cls.__name__).strip(), "", "usage: [config_file.py ...] [--key=value ...]", "", "keys:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}")
    return "\n".join(lines)
