"""The command line of an experiment, from its config tree (experiments/config_tree.py): every leaf is a flag,
bad input is one line.

`parse(cls, argv, algorithms)` builds the config: flags are the leaves' flat keys (`--shots`,
`--reptile-step-size`), `--algorithm NAME` picks the algorithm from the experiment's registry, and a flag of
another algorithm is a `FlagError`. `--help` shows one group per section, in declaration order, the options
shared by several algorithms (with each one's default) and a group per algorithm. `run(main)` turns bad input
into `error: <message>` on stderr and exit status 2 (3: diverged, 74: a checkpoint could not be written).
`run_folder` creates a run folder or checks that the one there holds the same run (resume), and locks it
against a second run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import maml
from experiments import config_tree, runlock
from experiments.config import NOT_RECORDED, FlagError
from experiments.config_tree import Leaf, Registry

C = TypeVar("C")


_NUMBER = r"((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|inf|infinity|nan)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # after a flag, -1e-3, -.5, -inf or -1,2 is a value (negative numbers), not a flag; argparse knows only
        # -1 and -0.5 (its private matcher, the one hook it has for this)
        self._negative_number_matcher = re.compile(rf"^-{_NUMBER}(,\s*-?{_NUMBER})*,?$", re.I)

    def error(self, message: str):  # one line, no usage dump
        match = re.match(r"^argument (--[\w-]+)", message)
        message = re.sub(r"^argument (--[\w-]+)(/--[\w-]+)?: (?=\1)", "", message)
        message = message.replace("unrecognized arguments", "unknown config field(s)")
        raise FlagError(match.group(1) if match else "", message)


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


def _add(group, leaf: Leaf, default_note: str = "") -> None:
    shown = "" if "default" in leaf.help else f" (default: {leaf.default})"
    help_ = (leaf.help + (f" ({default_note})" if default_note else shown)).replace("%", "%%")
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


def _first_line(obj: Any) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0].rstrip(".") if obj.__doc__ else ""


def _add_algorithms(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """`--algorithm`, the options several algorithms share (each one's default), one group per algorithm."""
    names = list(defaults)
    shared = parser.add_argument_group("algorithm", "options shared by several algorithms")
    shared.add_argument("--algorithm", dest="algorithm", default=argparse.SUPPRESS, metavar="NAME",
                        help=f"one of {', '.join(names)} (default: {names[0]})")
    per_key: dict[str, list[tuple[str, Leaf]]] = {}
    for name, value in defaults.items():
        for leaf in config_tree.algorithm_leaves(name, value):
            per_key.setdefault(leaf.key, []).append((name, leaf))
    own_groups: dict[str, Any] = {}
    for key, uses in per_key.items():
        name, leaf = uses[0]
        if key.startswith(f"{name}_") and len(uses) == 1:
            if name not in own_groups:
                own_groups[name] = parser.add_argument_group(f"--algorithm {name}", _first_line(type(defaults[name])))
            _add(own_groups[name], leaf)
            continue
        note = f"default: {leaf.default}" if len({repr(l.default) for _, l in uses}) == 1 else \
            "default: " + ", ".join(f"{n} {l.default}" for n, l in uses)
        _add(shared, leaf, note + ("; for " + ", ".join(n for n, _ in uses) if len(uses) < len(defaults) else ""))


def build_parser(cls: type, algorithms: Optional[Registry] = None) -> argparse.ArgumentParser:
    """The command line of `cls` (defaults shown are those of the default config)."""
    config_tree.all_leaves(cls, algorithms)  # every flag once
    parser = _Parser(description=(cls.__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run = None
    for f, tp in config_tree.fields_of(cls):
        if f.metadata.get("section"):
            group = parser.add_argument_group(f"{f.name}: {_first_line(tp)}")
            for leaf in config_tree.leaves(tp, (f.name,)):
                _add(group, leaf)
        elif f.metadata.get("algorithm"):
            _add_algorithms(parser, dict(config_tree.registry_defaults(cls, algorithms)))
        else:
            run = run or parser.add_argument_group("run")
            _add(run, next(leaf for leaf in config_tree.leaves(cls) if leaf.name == f.name and not leaf.path))
    return parser


def parse(config_cls: type[C], argv: Optional[Sequence[str]] = None, algorithms: Optional[Registry] = None) -> C:
    """The config from the command line (defaults where a flag is absent); `FlagError` on bad input."""
    args = build_parser(config_cls, algorithms).parse_args(argv)
    return config_tree.build(config_cls, vars(args), algorithms, "the command line")


def _folder(out: str) -> Path:
    """`--out` as a folder, created when absent; one line if it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FlagError("--out", f"--out {out!r} is a file; expected a directory (existing or to be created)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_flag(leaf: Leaf, value: Any) -> str:
    """How `value` of `leaf` is typed on the command line: `--hidden 40,40`, `--no-progress`."""
    if leaf.type is bool:
        return leaf.flag if value else "--no-" + leaf.flag[2:]
    shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return f"{leaf.flag} {shown}"


def check_saved_run(out: str, saved: dict, config: Any) -> Optional[str]:
    """Check that `saved` (the flat config.json in `--out`) is a run of `config`, which then resumes it: every
    leaf agrees but the resumable ones. A leaf missing from `saved` (written by a version before the leaf)
    agrees when this run has the value the leaf declares for its absence (`flag(absent=...)`): the one-line
    note returned says so (None when nothing is missing). `FlagError` naming the fields otherwise."""
    current = config_tree.to_flat(config)
    leaves = {leaf.key: leaf for leaf, _ in config_tree.flat_leaves(config) if not leaf.resumable}
    compared = {*leaves, "experiment"} | (saved.keys() - current.keys())  # a field this version dropped differs
    differ = sorted(k for k in saved if k in compared and saved[k] != current.get(k))
    if differ:
        raise FlagError("--out", f"--out {out!r} holds a run with another config ({', '.join(differ)} differ); "
                                 "use a new --out or the same settings to resume")
    missing = [leaves[k] for k in leaves if k not in saved]
    unknown = [leaf.flag for leaf in missing if leaf.absent is NOT_RECORDED]
    if unknown:
        raise FlagError("--out", f"--out {out!r} holds a run of an older version without {', '.join(unknown)}, and no "
                                 "value is known to reproduce what it did; use a new --out")
    changed = [leaf for leaf in missing if config_tree.to_json(leaf.absent) != current[leaf.key]]
    if changed:
        raise FlagError("--out", f"--out {out!r} holds a run of an older version without "
                                 f"{', '.join(leaf.flag for leaf in changed)}, which ran as "
                                 f"{' '.join(_as_flag(leaf, leaf.absent) for leaf in changed)}; pass that to resume "
                                 "it, or use a new --out")
    if missing:
        return (f"note: --out {out!r} holds a run of an older version without "
                f"{', '.join(leaf.flag for leaf in missing)}; resuming with "
                f"{' '.join(_as_flag(leaf, leaf.absent) for leaf in missing)}, which is what it did")
    return None


def _read_config(out: str, path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlagError("--out", f"--out {out!r}: {path.name} is not valid JSON ({e}); expected a run's config "
                                 "(use a new --out)") from None
    if not isinstance(saved, dict):
        raise FlagError("--out", f"--out {out!r}: {path.name} holds a {type(saved).__name__}; expected a run's config "
                                 "(use a new --out)")
    return saved


@contextlib.contextmanager
def run_folder(out: str, config: Any) -> Iterator[Path]:
    """The output folder of `config`'s run while the block runs: created, or checked to hold a run of the same
    config (`check_saved_run`: then it resumes), and locked against other runs (experiments/runlock.py:
    a second run on it stops at once, naming this one). config.json is written atomically."""
    path = _folder(out)
    with runlock.held(path):
        saved = path / "config.json"
        if saved.exists():
            note = check_saved_run(out, _read_config(out, saved), config)
            if note:
                print(note, file=sys.stderr)
        maml.atomic_write_bytes(saved, json.dumps(config_tree.to_flat(config), indent=2).encode())
        yield path


EXIT_IO = 74  # sysexits.h EX_IOERR


def run(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Call `main(argv)`; bad input (ValueError) becomes one line `error: ...` on stderr and exit status 2;
    a divergence is one line and status 3; a checkpoint that cannot be written (a full disk) one line and
    status 74; a SIGTERM / Ctrl-C after checkpointing, 128 + the signal."""
    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except maml.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except maml.CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_IO)
    except maml.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
