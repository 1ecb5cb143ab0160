"""Command lines from trees of frozen dataclass configs: every leaf field is a flag, bad input is one line.

An experiment's config is a root dataclass whose fields are leaves (`flag(default, help)`), sections
(`section(SomeDataclass)`: a nested dataclass of leaves) and at most one algorithm (`algorithm_field()`),
chosen by `--algorithm NAME` from the experiment's registry of default values (see
experiments/algorithms.py). Flags are flat and unique across the tree (`--shots`, `--inner-lr`): a leaf's
flag is its field name; an option declared by one algorithm's own class carries that algorithm's name
(`--reptile-step-size`), while options shared through a base class do not (`--inner-steps`).
`config.json`, wandb's config and sweep parameters use the same flat keys (`reptile_step_size`).

`parse(cls, argv, algorithms)` builds the config (each dataclass's `__post_init__` validates its own
fields); `run(main)` turns bad input into `error: <message>` on stderr and exit status 2. Errors about one
flag are `FlagError`s carrying the flag they name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

C = TypeVar("C")
Registry = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""An experiment's algorithms: the config's leaf values by flat key (given ones, defaults elsewhere) ->
{algorithm name: default config}; e.g. defaults that depend on `ways`."""


class FlagError(ValueError):
    """Bad input for one flag (`flag`, e.g. "--inner-lr"), with a one-line message."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(message)


def flag(default: Any, help: str, *, resumable: bool = False) -> Any:
    """A config leaf with a default and the help text its `--flag` shows; `resumable` leaves (budgets,
    evaluation sizes, progress bars...) may differ between a run and its resumption."""
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable})


def section(cls: type) -> Any:
    """A nested section of the config (a frozen dataclass of leaves), built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"section": True})


def algorithm_field() -> Any:
    """The config's algorithm: one of the experiment's registry, chosen by `--algorithm NAME`."""
    return dataclasses.field(default=None, metadata={"algorithm": True})


def flag_of(key: str) -> str:
    """`--flag` of a flat key: `inner_lr` -> `--inner-lr`."""
    return "--" + key.replace("_", "-")


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """`FlagError` "--key=value; expected ..." unless `condition`."""
    if not condition:
        raise FlagError(flag_of(key), f"{flag_of(key)}={value!r}; expected {expected}")


def check_positive(config: Any, *names: str) -> None:
    """`FlagError` naming the first of `names` (fields of `config`) whose value is not > 0."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        check(all(v is None or v > 0 for v in values), name, value, "a positive number")


def check_int(config: Any, name: str, low: int, note: str = "") -> None:
    value = getattr(config, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    check(ok, name, value, f"an integer >= {low}{note}")


# ---------------------------------------------------------------- the tree's leaves


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flag: its flat `key`, the field `name` in the dataclass `owner` at `path` in the tree."""

    key: str
    name: str
    path: tuple[str, ...]
    owner: type
    type: Any
    default: Any
    help: str
    resumable: bool

    @property
    def flag(self) -> str:
        return flag_of(self.key)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    # Names resolve in the class's module only: a field may share its name with a module (`tracking`).
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]), localns={})
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def leaves(cls: type, path: tuple[str, ...] = ()) -> list[Leaf]:
    """The flags of a config class (sections included, the algorithm excluded), in declaration order."""
    out = []
    for f, tp in _fields(cls):
        if f.metadata.get("algorithm"):
            continue
        if f.metadata.get("section"):
            out += leaves(tp, path + (f.name,))
            continue
        out.append(Leaf(f.name, f.name, path, cls, tp, _default(f), f.metadata.get("help", ""),
                        f.metadata.get("resumable", False)))
    return out


def algorithm_leaves(name: str, value: Any) -> list[Leaf]:
    """The flags of one algorithm's config value: shared (declared by a base class) or its own
    (`--NAME-FIELD`); defaults are `value`'s."""
    cls, own = type(value), vars(type(value)).get("__annotations__", {})
    out = []
    for f, tp in _fields(cls):
        key = f"{name}_{f.name.rstrip('_')}" if f.name in own else f.name
        out.append(Leaf(key, f.name, ("algorithm",), cls, tp, getattr(value, f.name), f.metadata.get("help", ""),
                        f.metadata.get("resumable", False)))
    return out


def _algorithm_name(cls: type) -> Optional[str]:
    return next((f.name for f, _ in _fields(cls) if f.metadata.get("algorithm")), None)


# ---------------------------------------------------------------- conversion of values


def _converter(tp: Any) -> tuple[Callable[[str], Any], str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        inner, meta = _converter(next(a for a in args if a is not type(None)))
        return (lambda s: None if s.lower() == "none" else inner(s)), meta
    if origin is tuple:
        elem = args[0]
        return (lambda s: tuple(elem(v) for v in s.split(",") if v.strip())), "A,B,..."
    if tp in (int, float, str):
        return tp, tp.__name__.upper()
    raise TypeError(f"unsupported config field type {tp!r}")


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _from_json(leaf: Leaf, value: Any) -> Any:
    """A config.json value back to the leaf's type (lists are tuples)."""
    origin = typing.get_origin(leaf.type)
    if isinstance(value, list) and (origin is tuple or typing.get_args(leaf.type) and
                                    any(typing.get_origin(a) is tuple for a in typing.get_args(leaf.type))):
        return tuple(value)
    return value


# ---------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        match = re.match(r"^argument (--[\w-]+)", message)
        message = re.sub(r"^argument (--[\w-]+)(/--[\w-]+)?: (?=\1)", "", message)
        message = message.replace("unrecognized arguments", "unknown config field(s)")
        raise FlagError(match.group(1) if match else "", message)


def _add(group, leaf: Leaf, default_note: str = "") -> None:
    shown = "" if "default" in leaf.help else f" (default: {leaf.default})"
    help_ = leaf.help + (f" ({default_note})" if default_note else shown)
    help_ = help_.replace("%", "%%")
    if leaf.type is bool:
        group.add_argument(leaf.flag, dest=leaf.key, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        return
    conv, metavar = _converter(leaf.type)

    def typed(s, conv=conv, leaf=leaf):
        try:
            return conv(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{leaf.flag}={s!r}; expected {type_name(leaf.type)}")

    group.add_argument(leaf.flag, dest=leaf.key, type=typed, default=argparse.SUPPRESS, metavar=metavar, help=help_)


def _registry_defaults(cls: type, algorithms: Optional[Registry], given: Mapping[str, Any] = {}) -> Mapping[str, Any]:
    if algorithms is None:
        return {}
    return algorithms({**{leaf.key: leaf.default for leaf in leaves(cls)}, **given})


def build_parser(cls: type, algorithms: Optional[Registry] = None) -> argparse.ArgumentParser:
    """The command line of `cls`: one help group per section, the algorithm's shared options, and one group
    per algorithm for its own options (defaults shown are those of the default config)."""
    parser = _Parser(description=(cls.__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: dict[str, Leaf] = {}

    def unique(leaf: Leaf) -> bool:
        if leaf.key in seen and (seen[leaf.key].owner, seen[leaf.key].name) != (leaf.owner, leaf.name):
            if leaf.path != ("algorithm",) or seen[leaf.key].path != ("algorithm",):
                raise TypeError(f"config {cls.__name__}: flag {leaf.flag} is defined twice")
        new = leaf.key not in seen
        seen.setdefault(leaf.key, leaf)
        return new

    groups: dict[tuple[str, ...], Any] = {}
    for leaf in leaves(cls):
        if leaf.path not in groups:
            about = leaf.owner.__doc__.strip().splitlines()[0].rstrip(".") if leaf.owner.__doc__ and leaf.path else ""
            groups[leaf.path] = parser.add_argument_group(f"{'.'.join(leaf.path)}: {about}" if leaf.path else "run")
        if unique(leaf):
            _add(groups[leaf.path], leaf)
    defaults = _registry_defaults(cls, algorithms)
    if _algorithm_name(cls) and defaults:
        names = list(defaults)
        shared = parser.add_argument_group("algorithm", "options shared by several algorithms; each algorithm's "
                                           "default in brackets")
        shared.add_argument("--algorithm", dest="algorithm", default=argparse.SUPPRESS, metavar="NAME",
                            help=f"one of {', '.join(names)} (default: {names[0]})")
        own_groups = {}
        per_key: dict[str, list[tuple[str, Leaf]]] = {}
        for name, value in defaults.items():
            for leaf in algorithm_leaves(name, value):
                per_key.setdefault(leaf.key, []).append((name, leaf))
        for key, uses in per_key.items():
            name, leaf = uses[0]
            if key.startswith(f"{name}_") and len(uses) == 1:
                if name not in own_groups:
                    own_groups[name] = parser.add_argument_group(
                        f"--algorithm {name}", (type(defaults[name]).__doc__ or "").strip().splitlines()[0])
                unique(leaf)
                _add(own_groups[name], leaf)
            else:
                unique(leaf)
                values = {repr(l.default) for _, l in uses}
                note = f"default: {leaf.default}" if len(values) == 1 else \
                    "default: " + ", ".join(f"{n} {l.default}" for n, l in uses)
                if len(uses) < len(defaults):
                    note += "; for " + ", ".join(n for n, _ in uses)
                _add(shared, leaf, note)
    return parser


# ---------------------------------------------------------------- building configs


def _build(cls: type, given: dict[str, Any], algorithms: Optional[Registry], where: str) -> Any:
    """The config from flat `given` values (absent ones take their defaults); `where` names their source."""
    given = dict(given)
    defaults = _registry_defaults(cls, algorithms, given)
    values: dict[str, Any] = {}
    for f, tp in _fields(cls):
        if f.metadata.get("section"):
            values[f.name] = tp(**{leaf.name: given.pop(leaf.key) for leaf in leaves(tp) if leaf.key in given})
        elif not f.metadata.get("algorithm") and f.name in given:
            values[f.name] = given.pop(f.name)
    name = _algorithm_name(cls)
    if name is not None and algorithms is not None:
        chosen = given.pop("algorithm", next(iter(defaults)))
        if chosen not in defaults:
            raise FlagError("--algorithm", f"--algorithm={chosen!r}; expected one of {', '.join(defaults)}")
        own = {leaf.key: leaf for leaf in algorithm_leaves(chosen, defaults[chosen])}
        other = sorted(k for k in given if k not in own)
        for key in other:
            users = [n for n, v in defaults.items() if key in {l.key for l in algorithm_leaves(n, v)}]
            if users:
                raise FlagError(flag_of(key), f"{flag_of(key)} is an option of --algorithm "
                                              f"{' / '.join(users)}, not of --algorithm {chosen}; drop the flag")
        values[name] = dataclasses.replace(defaults[chosen], **{own[k].name: given.pop(k) for k in list(given) if k in own})
    if given:
        raise FlagError(flag_of(next(iter(given))), f"unknown config field(s) in {where}: "
                                                      f"{', '.join(flag_of(k) for k in given)}")
    return cls(**values)


def parse(config_cls: type[C], argv: Optional[Sequence[str]] = None, algorithms: Optional[Registry] = None) -> C:
    """The config from the command line (defaults where a flag is absent); `FlagError` on bad input."""
    args = build_parser(config_cls, algorithms).parse_args(argv)
    return _build(config_cls, vars(args), algorithms, "the command line")


def all_leaves(config_cls: type, algorithms: Optional[Registry] = None) -> dict[str, Leaf]:
    """Every flag of the command line by key: the config's and every algorithm's (the first algorithm's
    default where several share a flag)."""
    known = {leaf.key: leaf for leaf in leaves(config_cls)}
    defaults = _registry_defaults(config_cls, algorithms)
    if defaults and _algorithm_name(config_cls):
        known["algorithm"] = Leaf("algorithm", "algorithm", (), config_cls, str, next(iter(defaults)),
                                  "one of " + ", ".join(defaults), False)
    for name, value in defaults.items():
        for leaf in algorithm_leaves(name, value):
            known.setdefault(leaf.key, leaf)
    return known


def from_flat(config_cls: type[C], flat: Mapping[str, Any], algorithms: Optional[Registry] = None,
              where: str = "config.json") -> C:
    """A config from its flat form (`to_flat`, e.g. a run's config.json)."""
    known = all_leaves(config_cls, algorithms)
    given = {k: (_from_json(known[k], v) if k in known else v) for k, v in flat.items() if k != "experiment"}
    return _build(config_cls, given, algorithms, where)


def flat_leaves(config: Any) -> list[tuple[Leaf, Any]]:
    """Every leaf of a built config with its value (the algorithm's under its registry name)."""
    out = [(leaf, _get(config, leaf)) for leaf in leaves(type(config))]
    name = _algorithm_name(type(config))
    algo = getattr(config, name) if name else None
    if algo is not None:
        out.append((Leaf("algorithm", "algorithm", (), type(config), str, algo.name, "", False), algo.name))
        out += [(leaf, getattr(algo, leaf.name)) for leaf in algorithm_leaves(algo.name, algo)]
    return out


def _get(config: Any, leaf: Leaf) -> Any:
    for p in leaf.path:
        config = getattr(config, p)
    return getattr(config, leaf.name)


def to_flat(config: Any) -> dict[str, Any]:
    """The config as flat JSON values by flag key (tuples as lists): config.json, wandb's config. The
    experiment's name comes first (`experiment`: the root class's `experiment` attribute) when it has one."""
    head = {"experiment": type(config).experiment} if hasattr(type(config), "experiment") else {}
    return {**head, **{leaf.key: list(v) if isinstance(v, tuple) else v for leaf, v in flat_leaves(config)}}


# ---------------------------------------------------------------- run folders and the entry point


def prepare_out(out: str, config: Any) -> Path:
    """Create the output folder, or check that an existing one holds a run of the same config (resume):
    the saved config.json must agree with this config on every leaf but the resumable ones."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FlagError("--out", f"--out {out!r} is a file; expected a directory (existing or to be created)")
    path.mkdir(parents=True, exist_ok=True)
    saved = path / "config.json"
    current = to_flat(config)
    if saved.exists():
        old = json.loads(saved.read_text())
        ignore = {leaf.key for leaf, _ in flat_leaves(config) if leaf.resumable}
        differ = sorted(k for k in set(old) | set(current) if k not in ignore and old.get(k) != current.get(k))
        if differ:
            raise FlagError("--out",
                            f"--out {out!r} holds a run with another config ({', '.join(differ)} differ); "
                            "use a new --out or the same settings to resume")
    saved.write_text(json.dumps(current, indent=2))
    return path


def run(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Call `main(argv)`; bad input (ValueError) becomes one line `error: ...` on stderr and exit status 2;
    a divergence is one line and status 3; a SIGTERM / Ctrl-C after checkpointing, 128 + the signal."""
    from maml import Diverged, Interrupted

    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
