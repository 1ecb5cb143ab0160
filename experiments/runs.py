"""Run folders written by the experiments, read back: the config rebuilt from config.json (through the same
code as the command line), the algorithm it trained with, and the newest checkpoint's state.

    run = runs.load(Path("runs/omniglot"), expect=("omniglot",), expected="an experiments.omniglot output folder")
    run.config, run.algo, run.state, run.step
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import maml
from experiments.config import FlagError
from experiments.config_tree import from_flat

EXPERIMENTS = {"sinusoid": "experiments.sinusoid", "omniglot": "experiments.omniglot"}
# How config.json files written before they named their experiment are told apart.
_SIGNATURES = {"sinusoid": ("hidden", "shots", "inner_lr"), "omniglot": ("data_dir", "ways", "shots", "filters")}


class Run(NamedTuple):
    """A run folder: its experiment (`kind`, `module`), rebuilt `config`, `algo`, newest checkpoint's `state`
    and the meta-iteration `step` it holds, and `setup`: the experiment's `setup(config)` (keys included)."""

    path: Path
    kind: str
    module: Any
    config: Any
    algo: Any
    state: maml.MetaTrainState
    step: int
    setup: Any


def read(run_dir: Path, *, expected: str, flag: str = "--checkpoint") -> tuple[str, dict]:
    """`(experiment, flat config)` of `run_dir/config.json`; one line otherwise."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FlagError(flag, f"{flag} {str(run_dir)!r} has no config.json; expected {expected}")
    try:
        flat = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FlagError(flag, f"{flag}: {path} is not valid JSON ({e}); expected {expected}") from None
    if not isinstance(flat, dict):
        raise FlagError(flag, f"{flag}: {path} holds a {type(flat).__name__}; expected {expected}")
    kind = flat.get("experiment") or next((k for k, keys in _SIGNATURES.items() if all(n in flat for n in keys)), None)
    if kind not in EXPERIMENTS:
        raise FlagError(flag, f"{flag} {str(run_dir)!r}: unknown run type (config fields {sorted(flat)[:8]}...); "
                              f"expected {expected}")
    return kind, flat


def load(run_dir: Path, *, expect: Sequence[str] = tuple(EXPERIMENTS), expected: str = "a run folder written by an "
         "experiment", overrides: Optional[Mapping[str, Any]] = None, flag: str = "--checkpoint") -> Run:
    """The run in `run_dir`, if it is one of the experiments in `expect`; `overrides` replace config values
    (e.g. another `data_dir`). One line for a folder that is not such a run or holds no checkpoint."""
    run_dir = Path(run_dir)
    kind, flat = read(run_dir, expected=expected, flag=flag)
    if kind not in expect:
        raise FlagError(flag, f"{flag} {str(run_dir)!r} is an experiments.{kind} run; expected {expected}")
    module = importlib.import_module(EXPERIMENTS[kind])
    config = from_flat(module.CONFIG, {**flat, **(overrides or {})}, module.algorithms,
                           where=str(run_dir / "config.json"))
    setup = module.setup(config)
    found = maml.latest_checkpoint(run_dir / "checkpoints", setup.state)
    if found is None:
        raise FlagError(flag, f"{flag} {str(run_dir)!r} holds no checkpoint in checkpoints/; expected a trained "
                              f"(or partly trained) run")
    step, state = found
    return Run(run_dir, kind, module, config, setup.algo, state, step, setup)
