"""Typed configuration: one dataclass per stage, overridable from a YAML file and the CLI.

Each field carries its help text as `metadata={"help": ...}`. Precedence: defaults < YAML
(`--config recipe.yaml`) < command-line flags. Field `foo_bar` is flag `--foo-bar`; tuples take
comma-separated values (`--delta-clip -0.08,0.3` or `--delta-clip=-0.08,0.3`); booleans take
true/false, or stand bare for true (`--smoke`). A field whose type is itself such a dataclass is
a group shared by several stages (the scorer's `WeightConfig`, train's `PromptConfig`): its fields
are flags of their own (`--variant`, not `--weights-variant`), and YAML takes them flat or nested
under the group's name. A field whose help is `argparse.SUPPRESS` is a flag left out of `--help`
(one that a parent process passes to its child).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import logging
import re
import typing
from pathlib import Path
from typing import Any, Callable

from common import console
from common.errors import ConfigError  # noqa: F401  (the stages import it from here)
from common.storage import local_file

# a value that starts with "-" but is numbers: argparse would take "-0.08,0.3" for a flag
NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?(,\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?)*$", re.I)



def field(default, help: str, **kw):
    """A dataclass field with help text (mutable defaults, groups included, become factories)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
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


def _flags(cls) -> list[tuple[str, dataclasses.Field, object, str | None]]:
    """(name, field, type, group) of every flag of `cls`: its own fields and its groups' fields."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(sub.name, sub, typing.get_type_hints(tp)[sub.name], f.name) for sub in dataclasses.fields(tp)]
        else:
            out.append((f.name, f, tp, None))
    names = [n for n, *_ in out]
    assert len(names) == len(set(names)), f"{cls.__name__}: a group repeats a flag name"
    return out


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--epoch` is not `--epochs`) and with one-line errors: a
    mistyped flag is named with the nearest real one, not answered with the whole usage block."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message: str):
        import sys

        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def unknown(self, extra: list[str]):
        """The first argument that is no flag of this parser, as an error naming the nearest flag."""
        token = next((a for a in extra if a.startswith("-")), extra[0])
        name = token.partition("=")[0]
        if not name.startswith("-"):
            self.error(f"unexpected argument {token!r}; a flag takes one value (--name value)")
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        near = difflib.get_close_matches(name, flags, n=1, cutoff=0.5)
        # a prefix of exactly one flag is what argparse would have taken it for: name that one
        prefixed = [f for f in flags if f.startswith(name)]
        near = prefixed[:1] if len(prefixed) == 1 else near
        self.error(f"unknown flag {name}" + (f"; did you mean {near[0]}?" if near else "; --help lists the flags"))


def parse(cls, argv=None, description: str | None = None):
    """Build `cls` from defaults, an optional `--config` YAML file and command-line flags."""
    return parse_given(cls, argv, description)[0]


def parse_given(cls, argv=None, description: str | None = None) -> tuple[typing.Any, set[str]]:
    """`parse`, and the names of the fields given (in the YAML file or as flags), so that a stage can
    take what was not given from elsewhere (`reweight`: from the shards). A config class may set
    `GROUP_DEFAULTS` to the help's words for the default of its groups' flags."""
    import sys

    flags = _flags(cls)
    p = _Parser(description=description or cls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML file of field values (flags override it)")
    defaults = _defaults(cls)
    for name, f, tp, group in flags:
        shown = getattr(getattr(defaults, group), name) if group and defaults is not None else _default(f)
        if group and getattr(cls, "GROUP_DEFAULTS", None):
            shown = cls.GROUP_DEFAULTS
        text = f.metadata.get("help", "")
        text = text if text == argparse.SUPPRESS else (text + f" (default: {shown})").replace("%", "%%")
        bare = {"nargs": "?", "const": "true"} if tp is bool else {}  # `--smoke` alone: true
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text, **bare)
    ns, extra = p.parse_known_args(_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if extra:
        p.unknown(extra)
    values = {}
    if ns.config is not None:
        import yaml

        if not ns.config.exists():
            p.error(f"config file not found: {ns.config}")
        loaded = yaml.safe_load(ns.config.read_text()) or {}
        groups = {g for *_, g in flags if g}
        for g in groups & set(loaded):  # a group's fields nested under its name
            if not isinstance(loaded[g], dict):
                p.error(f"{ns.config}: {g} must be a mapping of its fields")
            loaded.update(loaded.pop(g))
        unknown = set(loaded) - {n for n, *_ in flags}
        if unknown:
            p.error(f"{ns.config}: unknown fields {sorted(unknown)}")
        values.update(loaded)
    for name, *_ in flags:
        v = getattr(ns, name)
        if v is not None:
            values[name] = v
    try:
        cfg = _build(cls, flags, values, defaults)
    except (ConfigError, ValueError, TypeError) as e:
        # a value that does not convert: one line naming the flag, exit code 2 (not argparse's usage block)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # "config": a recipe file of the user's was given, which replaces a stage's embedded one
    return cfg, set(values) | ({"config"} if ns.config is not None else set())


def configure(cls, settings: dict):
    """`cls` from its defaults and `settings` (field names, a group's fields flat or nested under its
    name, values as YAML or flags give them): how one stage sets up another in code, or in a child
    process from a JSON file of the same settings. ConfigError names an unknown field or a value that
    does not convert."""
    flags = _flags(cls)
    values = _flat(flags, settings)
    defaults = _defaults(cls)
    try:
        return _build(cls, flags, values, defaults)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _flat(flags, settings: dict) -> dict:
    """`settings` with each group's nested fields flattened; ConfigError names the unknown fields."""
    values = dict(settings)
    for g in {g for *_, g in flags if g} & set(values):
        values.update(values.pop(g))
    unknown = set(values) - {n for n, *_ in flags}
    if unknown:
        raise ConfigError(f"unknown fields {sorted(unknown)}")
    return values


def _build(cls, flags, values: dict, defaults):
    """`cls(...)` with `values` (converted to the fields' types) over the defaults."""
    top, grouped = _typed(flags, values)
    for group, given in grouped.items():
        base = getattr(defaults, group) if defaults is not None else typing.get_type_hints(cls)[group]()
        top[group] = dataclasses.replace(base, **given)
    return cls(**top)


def beneath(cfg, values: dict, given: set[str]):
    """`cfg` with `values` for the fields not in `given` (a recipe's settings beneath the flags given,
    as `parse_given` names them): field names, a group's fields flat or nested under its name, YAML
    or flag values converted to the fields' types. ConfigError names an unknown field or a value
    that does not convert."""
    flags = _flags(type(cfg))
    values = _flat(flags, values)
    aliases = getattr(type(cfg), "ALIASES", {})  # another name of a field given (TRL's) counts as the field
    given = set(given) | {aliases[name] for name in given if name in aliases}
    top, grouped = _typed(flags, {k: v for k, v in values.items() if k not in given})
    for group, settings in grouped.items():
        top[group] = dataclasses.replace(getattr(cfg, group), **settings)
    return dataclasses.replace(cfg, **top)


def _typed(flags, values: dict) -> tuple[dict, dict[str, dict]]:
    """The `values` given, each converted to its field's type: (top-level fields, {group: its fields});
    ConfigError names the flag of a value that does not convert."""
    top, grouped = {}, {}
    for name, _, tp, group in flags:
        if name in values:
            try:
                (grouped.setdefault(group, {}) if group else top)[name] = _convert(values[name], tp)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
    return top, grouped


def _negative_values(argv: list[str]) -> list[str]:
    """`--flag -0.08,0.3` as `--flag=-0.08,0.3`: argparse takes a lone negative number as a value, but
    not a comma list of them, which it reads as an unknown flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _defaults(cls):
    """`cls()`, or None when a field of it has no default."""
    return cls() if all(_default(f) != "required" for f in dataclasses.fields(cls)) else None


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"


def setup_logging(level: int = logging.INFO) -> None:
    """The entry points' log: time, logger name, message (once per process)."""
    logging.basicConfig(level=level, format=console.FORMAT)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as its command line and the other stages run it: its config class, `work(cfg)` (or
    `work(cfg, given)` with `takes_given`: the names of the fields given, and "config" when a recipe
    file of the user's was) and `report(result)`, the text printed when it is done.

    A ConfigError (or one of `errors`) is one line `error: ...` and exit code 2, and the log and
    folders made for it are removed again (console.discard_log); otherwise the report is printed
    (unless empty) and the exit code is `status(result)` if given (a benchmark some of whose runs
    failed), else 0. `log`: the file in the config's `out` folder that other libraries' output goes
    to (common/console.py, with PEAR_QUIET=1); any other exception then ends the stage with its
    one-line cause on the terminal and the traceback in that file."""

    config: type
    work: Callable[..., Any]
    report: Callable[[Any], str | None]
    doc: str | None = None
    errors: tuple[type[Exception], ...] = ()
    log: str | None = None
    takes_given: bool = False
    status: Callable[[Any], int] | None = None

    def main(self, argv=None) -> int:
        """The command line: the config from defaults, `--config` YAML and flags."""
        return self.call(*parse_given(self.config, argv, description=self.doc))

    def run(self, settings: dict, beneath_given: Callable[[Any, set[str]], Any] | None = None) -> int:
        """The stage with `settings` over its defaults (`configure`): how another stage runs it.
        `beneath_given(cfg, names given)` lays a recipe beneath them (pipelines/recipes.py `with_recipe`)."""
        try:
            cfg = configure(self.config, settings)
            if beneath_given:
                cfg = beneath_given(cfg, set(settings))
        except ConfigError as e:
            print(f"error: {e}", file=console.err())
            return 2
        return self.call(cfg, set(settings))

    def call(self, cfg, given: set[str]) -> int:
        if self.log:
            console.quiet(local_file(cfg.out, self.log))  # OUT may be a URI: the log stays on this machine
        try:
            result = self.work(cfg, given) if self.takes_given else self.work(cfg)
        except (ConfigError, *self.errors) as e:
            print(f"error: {e}", file=console.err())
            console.discard_log()  # a refused run leaves no output folder and no log behind
            return 2
        text = self.report(result)
        if text:
            print(text, file=console.out())
        return self.status(result) if self.status else 0


def cli(cls, argv, description: str | None, work, report, errors: tuple[type[Exception], ...] = (),
        log: str | None = None, given: bool = False, status=None) -> int:
    """The command line of a stage that no other stage runs: `Stage(...).main(argv)`."""
    return Stage(cls, work, report, description, errors, log, given, status).main(argv)
