"""Configuration of the scripts: a dataclass of defaults, then config files, then ``--key=value`` overrides.

    python -m nanoGPT.train config/train_shakespeare_char_cpu.py --attention=srf --max_iters=500
    python -m nanoGPT.train --quick                       # the script's quick settings (seconds on a CPU)

A config file is Python made of plain assignments (``n_layer = 4``); it is executed in an empty namespace and
every public name it defines must be a field of the dataclass. An override's value is read with
``ast.literal_eval`` (numbers, booleans, None, strings, dicts such as ``--attention_options={'k': 32}``) and
falls back to the raw string; either way it must have the type of the field's default. Unknown keys and wrong
types are errors (:class:`ConfigError`) that name the key, so a typo never passes silently.

``--quick`` stands for the arguments a script declares as its quick settings (config files and overrides);
they apply after the config files on the command line and before its ``--key=value`` overrides, so that an
explicit override still wins.
"""
from __future__ import annotations

import ast
import dataclasses
import types
import typing
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_CONFIG = "config/train_tiny.py"  # the model `python -m nanoGPT.train --quick` trains


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, malformed override, or a value out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


def resolve_config_path(path: str) -> Path:
    """A config file as given, or relative to the nanoGPT folder (``config/x.py`` works from the repo root)."""
    for candidate in (Path(path), PACKAGE_DIR / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file {path!r} not found (looked in the current folder and {PACKAGE_DIR})")


def read_config_file(path: str) -> dict:
    """The public names a config file assigns (``config/x.py`` works from the repository root)."""
    path = resolve_config_path(path)
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


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
        raise ConfigError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(types_))}")
    if not _accepts(types_[key], value):
        raise ConfigTypeError(f"{source}: {key} must be {types_[key]}, got {value!r} ({type(value).__name__})")
    if isinstance(value, int) and not isinstance(value, bool) and types_[key] is float:
        value = float(value)
    values[key] = value


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(cls, argv: list[str], defaults: dict | None = None, quick: list[str] | None = None):
    """An instance of the dataclass ``cls`` from its defaults, then ``defaults``, then the config files and
    ``--key=value`` overrides in ``argv``, in the order given. With ``quick`` (the script's quick settings:
    config files and overrides), ``--quick`` in ``argv`` applies them after argv's config files and before its
    overrides; without it ``--quick`` is an unknown key."""
    types_ = _field_types(cls)
    argv = list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(cls, quick))
        raise SystemExit(0)
    if quick is not None:
        argv = _expand_quick(argv, quick)
    values: dict = {}
    for key, value in (defaults or {}).items():
        _set(values, types_, key, value, "defaults")
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            _set(values, types_, key, parse_value(text), f"override {arg!r}")
        else:
            for key, value in read_config_file(arg).items():
                _set(values, types_, key, value, f"config file {resolve_config_path(arg)}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigTypeError(str(err)) from err
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _expand_quick(argv: list[str], quick: list[str]) -> list[str]:
    """argv with ``--quick`` (or ``--quick=True``) replaced by ``quick``, placed after the config files."""
    flags = [a for a in argv if a == "--quick" or a.startswith("--quick=")]
    on = False
    for flag in flags:
        value = True if flag == "--quick" else parse_value(flag.partition("=")[2])
        if not isinstance(value, bool):
            raise ConfigTypeError(f"override {flag!r}: quick must be True or False")
        on = value
    rest = [a for a in argv if a not in flags]
    if not on:
        return rest
    return [a for a in rest if not a.startswith("--")] + list(quick) + [a for a in rest if a.startswith("--")]


def help_text(cls, quick: list[str] | None = None) -> str:
    usage = "usage: [config_file.py ...] [--key=value ...]" + (" [--quick]" if quick is not None else "")
    lines = [(cls.__doc__ or cls.__name__).strip(), "", usage, ""]
    if quick is not None:
        lines += [f"--quick: finish in seconds; stands for {' '.join(quick)} (explicit --key=value still win)", ""]
    lines.append("keys:")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}")
    return "\n".join(lines)
