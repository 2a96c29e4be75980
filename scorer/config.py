"""Flat, typed configuration: one dataclass per stage, overridable from a YAML file and the CLI.

Each field carries its help text as `metadata={"help": ...}`. Precedence: defaults < YAML
(`--config recipe.yaml`) < command-line flags. Field `foo_bar` is flag `--foo-bar`; tuples take
comma-separated values (`--delta-clip=-0.08,0.3`); booleans take true/false.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path


class ConfigError(Exception):
    """Bad input found before any work starts: the entry points print its one line and exit 2."""


def field(default, help: str, **kw):
    """A dataclass field with help text (mutable defaults become factories)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _to_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _convert(value, tp):
    """Coerce a YAML or CLI value to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _convert(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        return tuple(_convert(x, inner) for x in items)
    if tp is bool:
        return value if isinstance(value, bool) else _to_bool(value)
    if tp in (int, float, str):
        return tp(value)
    return value


def parse(cls, argv=None, description: str | None = None):
    """Build `cls` from defaults, an optional `--config` YAML file and command-line flags."""
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(description=description or cls.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML file of field values (flags override it)")
    for f in dataclasses.fields(cls):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       help=f.metadata.get("help", "") + f" (default: {_default(f)})")
    ns = p.parse_args(argv)
    values = {}
    if ns.config is not None:
        import yaml

        if not ns.config.exists():
            p.error(f"config file not found: {ns.config}")
        loaded = yaml.safe_load(ns.config.read_text()) or {}
        unknown = set(loaded) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            p.error(f"{ns.config}: unknown fields {sorted(unknown)}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is not None:
            values[f.name] = v
    try:
        return cls(**{k: _convert(v, hints[k]) for k, v in values.items()})
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        p.error(str(e))


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"
