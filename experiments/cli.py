"""Command lines from frozen dataclass configs: every field is a flag, bad input is one line.

`parse(ConfigClass, argv)` builds `--field-name VALUE` flags from the dataclass fields (their help is the
field's `metadata["help"]`), converts and validates them (the class's `__post_init__` raises ValueError),
and `run(main)` turns any `ValueError` into `error: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

C = TypeVar("C")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        message = re.sub(r"^argument (--[\w-]+)(/--[\w-]+)?: (?=\1)", "", message)
        raise ValueError(message.replace("unrecognized arguments", "unknown config field(s)"))


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


def flag(default: Any, help: str) -> Any:
    """A config field with a default and the help text its `--flag` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(config_cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp, help_ = hints[f.name], f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(field_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        conv, metavar = _converter(tp)

        def typed(s, conv=conv, name=f.name):
            try:
                return conv(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{field_flag(name)}={s!r}; expected {tp_name(hints[name])}")

        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(field_flag(f.name), type=typed, default=default, metavar=metavar, help=help_)
    return parser


def tp_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse(config_cls: type[C], argv: Optional[Sequence[str]] = None) -> C:
    """The config from the command line (defaults where a flag is absent); ValueError on bad input."""
    doc = (config_cls.__doc__ or "").strip()
    args = build_parser(config_cls, doc).parse_args(argv)
    return config_cls(**vars(args))


def to_json(config: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def check_positive(config: Any, *names: str) -> None:
    """ValueError naming the first of `names` whose value is not > 0."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not v > 0 for v in values):
            raise ValueError(f"{field_flag(name)}={value!r}; expected a positive number")


def prepare_out(out: str, config: Any, ignore: Sequence[str] = ()) -> Path:
    """Create the output folder, or check that an existing one holds a run of the same config (resume).

    Fields in `ignore` (e.g. the iteration budget) may differ between the runs.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} is a file; expected a directory (existing or to be created)")
    path.mkdir(parents=True, exist_ok=True)
    saved = path / "config.json"
    current = to_json(config)
    if saved.exists():
        old = json.loads(saved.read_text())
        differ = sorted(k for k in set(old) | set(current) if k not in ignore and old.get(k) != current.get(k))
        if differ:
            raise ValueError(
                f"--out {out!r} holds a run with another config ({', '.join(differ)} differ); "
                "use a new --out or the same settings to resume"
            )
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
