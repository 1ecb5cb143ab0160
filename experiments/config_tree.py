"""A config tree's leaves, building a config from flat values, and its flat form.

Every leaf of a config tree (experiments/config.py) has a flat key, unique across the tree: its field name,
or for an option declared by one algorithm's own class, that algorithm's name and the field
(`reptile_step_size`); options shared through a base class keep their name (`inner_steps`). `leaves`,
`algorithm_leaves` and `all_leaves` list them as `Leaf`s; `build` makes a config from flat values (a
`Registry` gives the experiment's algorithms); the flat form (`to_flat` / `from_flat`) is what config.json,
wandb's config, sweep parameters and the command line (experiments/cli.py, `--reptile-step-size`) use.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Callable, Mapping, NamedTuple, Optional, TypeVar

from experiments.config import NOT_RECORDED, FlagError, check, flag_of

C = TypeVar("C")
Registry = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""An experiment's algorithms: the config's leaf values by flat key (given ones, defaults elsewhere) ->
{algorithm name: default config}; e.g. defaults that depend on `ways`."""


# ---------------------------------------------------------------- the tree's leaves


class Leaf(NamedTuple):
    """One flag: its flat `key`, the field `name` in the dataclass `owner` at `path` in the tree."""

    key: str
    name: str
    path: tuple[str, ...]
    owner: type
    type: Any
    default: Any
    help: str
    resumable: bool
    absent: Any = NOT_RECORDED

    @property
    def flag(self) -> str:
        return flag_of(self.key)


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The init fields of `cls` with their types: those it declares itself first, then inherited ones."""
    hints: dict[str, Any] = {}
    for base in reversed(cls.__mro__):  # names resolve in each declaring class's module: a field may share
        if dataclasses.is_dataclass(base):  # its name with a module (`tracking`)
            hints.update(typing.get_type_hints(base, globalns=vars(sys.modules[base.__module__]), localns={}))
    own = vars(cls).get("__annotations__", {})
    fields = [f for f in dataclasses.fields(cls) if f.init]
    return [(f, hints[f.name]) for f in sorted(fields, key=lambda f: f.name not in own)]


def _leaf(key: str, f: dataclasses.Field, tp: Any, path: tuple[str, ...], owner: type, default: Any) -> Leaf:
    return Leaf(key, f.name, path, owner, tp, default, f.metadata.get("help", ""), f.metadata.get("resumable", False),
                f.metadata.get("absent", NOT_RECORDED))


def leaves(cls: type, path: tuple[str, ...] = ()) -> list[Leaf]:
    """The leaves of a config class (sections included, the algorithm excluded), in declaration order."""
    out = []
    for f, tp in fields_of(cls):
        if f.metadata.get("section"):
            out += leaves(tp, path + (f.name,))
        elif not f.metadata.get("algorithm"):
            out.append(_leaf(f.name, f, tp, path, cls, default_of(f)))
    return out


def algorithm_leaves(name: str, value: Any) -> list[Leaf]:
    """The leaves of one algorithm's config value: shared (declared by a base class) or its own
    (`NAME_FIELD`); defaults are `value`'s."""
    own = vars(type(value)).get("__annotations__", {})
    return [_leaf(f"{name}_{f.name.rstrip('_')}" if f.name in own else f.name, f, tp, ("algorithm",), type(value),
                  getattr(value, f.name)) for f, tp in fields_of(type(value))]


def algorithm_name(cls: type) -> Optional[str]:
    """The name of `cls`'s algorithm field, if it has one."""
    return next((f.name for f, _ in fields_of(cls) if f.metadata.get("algorithm")), None)


def registry_defaults(cls: type, algorithms: Optional[Registry], given: Mapping[str, Any] = {}) -> Mapping[str, Any]:
    """The experiment's algorithms for these given values (defaults elsewhere)."""
    if algorithms is None:
        return {}
    return algorithms({**{leaf.key: leaf.default for leaf in leaves(cls)}, **given})


def all_leaves(cls: type, algorithms: Optional[Registry] = None) -> dict[str, Leaf]:
    """Every leaf by key: the config's, `algorithm`, and every algorithm's (the first algorithm's default
    where several share one)."""
    own = leaves(cls)
    known = {leaf.key: leaf for leaf in own}
    defaults = registry_defaults(cls, algorithms)
    shared = {leaf.key for name, value in defaults.items() for leaf in algorithm_leaves(name, value)}
    clash = sorted({leaf.key for leaf in own if [l.key for l in own].count(leaf.key) > 1} | (shared & set(known)))
    if clash:
        raise TypeError(f"config {cls.__name__}: flags defined twice: {', '.join(flag_of(k) for k in clash)}")
    if defaults and algorithm_name(cls):
        known["algorithm"] = Leaf("algorithm", "algorithm", (), cls, str, next(iter(defaults)),
                                  "one of " + ", ".join(defaults), False)
    for name, value in defaults.items():
        for leaf in algorithm_leaves(name, value):
            known.setdefault(leaf.key, leaf)
    return known


# ---------------------------------------------------------------- built configs and their flat form


def build(cls: type[C], given: Mapping[str, Any], algorithms: Optional[Registry], where: str) -> C:
    """The config from flat `given` values (absent ones take their defaults); `where` names their source.
    A value of an algorithm other than the chosen one, or an unknown key, is a `FlagError`."""
    given = dict(given)
    defaults = registry_defaults(cls, algorithms, given)
    values: dict[str, Any] = {}
    for f, tp in fields_of(cls):
        if f.metadata.get("section"):
            values[f.name] = tp(**{leaf.name: given.pop(leaf.key) for leaf in leaves(tp) if leaf.key in given})
        elif not f.metadata.get("algorithm") and f.name in given:
            values[f.name] = given.pop(f.name)
    name = algorithm_name(cls)
    if name is not None and algorithms is not None:
        chosen = given.pop("algorithm", next(iter(defaults)))
        check(chosen in defaults, "algorithm", chosen, "one of " + ", ".join(defaults))
        own = {leaf.key: leaf for leaf in algorithm_leaves(chosen, defaults[chosen])}
        for key in sorted(k for k in given if k not in own):
            users = [n for n, v in defaults.items() if key in {l.key for l in algorithm_leaves(n, v)}]
            if users:
                raise FlagError(flag_of(key), f"{flag_of(key)} is an option of --algorithm "
                                              f"{' / '.join(users)}, not of --algorithm {chosen}; drop the flag")
        picked = {own[k].name: given.pop(k) for k in list(given) if k in own}
        values[name] = dataclasses.replace(defaults[chosen], **picked)
    if given:
        raise FlagError(flag_of(next(iter(given))), f"unknown config field(s) in {where}: "
                                                      f"{', '.join(flag_of(k) for k in given)}")
    return cls(**values)


def _json_fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value is one of type `tp` (int, float, str, bool, Optional[...], tuple[X, ...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_json_fits(a, value) for a in args)
    if origin is tuple:
        return isinstance(value, list) and all(_json_fits(args[0], v) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def _from_json(leaf: Leaf, value: Any, where: str) -> Any:
    """A config.json value back to the leaf's type (lists are tuples); `FlagError` if it is not of that type."""
    if not _json_fits(leaf.type, value):
        expected = getattr(leaf.type, "__name__", None) or str(leaf.type).replace("typing.", "")
        raise FlagError(leaf.flag, f"{where}: {leaf.key}={value!r}; expected {expected}")
    return tuple(value) if isinstance(value, list) else value


def from_flat(cls: type[C], flat: Mapping[str, Any], algorithms: Optional[Registry] = None,
              where: str = "config.json") -> C:
    """A config from its flat form (`to_flat`, e.g. a run's config.json); a value of the wrong type is a
    `FlagError` naming it."""
    known = all_leaves(cls, algorithms)
    given = {k: (_from_json(known[k], v, where) if k in known else v) for k, v in flat.items() if k != "experiment"}
    return build(cls, given, algorithms, where)


def _get(config: Any, leaf: Leaf) -> Any:
    for p in leaf.path:
        config = getattr(config, p)
    return getattr(config, leaf.name)


def flat_leaves(config: Any) -> list[tuple[Leaf, Any]]:
    """Every leaf of a built config with its value (the algorithm's under its registry name)."""
    out = [(leaf, _get(config, leaf)) for leaf in leaves(type(config))]
    name = algorithm_name(type(config))
    algo = getattr(config, name) if name else None
    if algo is not None:
        out.append((Leaf("algorithm", "algorithm", (), type(config), str, algo.name, "", False), algo.name))
        out += [(leaf, getattr(algo, leaf.name)) for leaf in algorithm_leaves(algo.name, algo)]
    return out


def to_json(value: Any) -> Any:
    """A leaf value as config.json holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def to_flat(config: Any) -> dict[str, Any]:
    """The config as flat JSON values by key (tuples as lists): config.json, wandb's config. The experiment's
    name comes first (`experiment`: the root class's `experiment` attribute) when it has one."""
    head = {"experiment": type(config).experiment} if hasattr(type(config), "experiment") else {}
    return {**head, **{leaf.key: to_json(v) for leaf, v in flat_leaves(config)}}
