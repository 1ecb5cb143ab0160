"""Declaring experiment configs: leaves (`flag`) and the rules they check, sections, the algorithm field.

A root config's fields are leaves (`flag(default, help, rule=...)`), sections (`section(SomeDataclass)`: a
nested dataclass of leaves) and at most one algorithm (`algorithm_field()`), chosen by name from the
experiment's registry of default values (see experiments/algorithms.py). Dataclasses inheriting `Checked`
check each leaf's `rule` when built; errors about one flag are `FlagError`s. A leaf added after runs were
written may declare `absent`: the value that a config.json without it stands for (what the older version
did), so that such a run resumes (experiments/cli.py, `check_saved_run`). Walking a tree, building one from
flat values and its flat form are experiments/config_tree.py.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, NamedTuple, Optional


class FlagError(ValueError):
    """Bad input for one flag (`flag`, e.g. "--inner-lr"), with a one-line message."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(message)


def flag_of(key: str) -> str:
    """`--flag` of a flat key: `inner_lr` -> `--inner-lr`."""
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------- declaring and checking leaves


class Rule(NamedTuple):
    """What a leaf's value must satisfy (None, "unset", always does), and how the error says it."""

    ok: Callable[[Any], bool]
    expected: str


def _all(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: all(test(x) for x in v) if isinstance(v, tuple) else test(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


POSITIVE = Rule(_all(lambda x: _finite(x) and x > 0), "a positive number")
NON_NEGATIVE = Rule(_all(lambda x: _finite(x) and x >= 0), ">= 0")
SEED = Rule(lambda v: _integer(v) and 0 <= v < 2 ** 32, "an integer in [0, 2**32)")
"""A PRNG seed: JAX keeps 32 bits (larger seeds would alias smaller ones, or overflow)."""
NOT_RECORDED = object()
"""The `absent` of a leaf for which no value is known to reproduce the versions before it (the default)."""


def at_least(low: int, note: str = "") -> Rule:
    """An integer >= `low` (`note` follows the message, e.g. " (0: off)")."""
    return Rule(lambda v: _integer(v) and v >= low, f"an integer >= {low}{note}")


def one_of(choices: typing.Iterable[str]) -> Rule:
    choices = tuple(choices)
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices))


def flag(default: Any, help: str, *, rule: Optional[Rule] = None, resumable: bool = False,
         absent: Any = NOT_RECORDED) -> Any:
    """A config leaf with a default, the help text its `--flag` shows, and the `rule` its value must meet;
    `resumable` leaves (budgets, evaluation sizes, progress bars...) may differ between a run and its
    resumption. `absent`: for a leaf added later, the value that reproduces what versions before it did
    (a run folder whose config.json lacks the leaf resumes when this run has that value)."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule, "resumable": resumable,
                                                        "absent": absent})


def section(cls: type) -> Any:
    """A nested section of the config (a frozen dataclass of leaves), built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"section": True})


def algorithm_field() -> Any:
    """The config's algorithm: one of the experiment's registry, chosen by `--algorithm NAME`."""
    return dataclasses.field(default=None, metadata={"algorithm": True})


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """`FlagError` "--key=value; expected ..." unless `condition`."""
    if not condition:
        raise FlagError(flag_of(key), f"{flag_of(key)}={value!r}; expected {expected}")


@dataclasses.dataclass(frozen=True)
class Checked:
    """Mixin of config dataclasses: building one checks every leaf's `rule` (unset values pass)."""

    def key(self, field: str) -> str:
        """The flat key of one of this dataclass's fields."""
        return field

    def __post_init__(self):
        for f in dataclasses.fields(self):
            rule, value = f.metadata.get("rule"), getattr(self, f.name)
            if rule is not None and value is not None:
                check(rule.ok(value), self.key(f.name), value, rule.expected)
