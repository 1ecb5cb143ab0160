"""A wandb sweep YAML read and checked against its experiment before anything runs, and a trial's command line.

`validate` checks the YAML's schema (with the `sweeps` engine, when given) and every parameter against the
experiment's config (`python -m experiments.NAME` in `command`): a field of it, with values its flags accept;
`expand` turns wandb's command macros into a trial's argv. Every problem is a one-line ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

from experiments import cli, config_tree
from experiments.config import FlagError, flag_of

BOOL_SAFE_MACROS = ("${args_no_boolean_flags}", "${args_json}", "${args_json_file}")


def plain(value: Any) -> Any:
    """numpy scalars (the engine's suggestions) to Python numbers, recursively."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def load_config(path: str) -> dict:
    """The YAML as a dict; ValueError for a missing or unreadable file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"sweep config {path!r} not found")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e} "
                         "(write ${...} macros in block lists: `- ${args}`)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping with method, parameters, command")
    return config


def experiment_module(config: dict, path: str) -> str:
    """`experiments.NAME` from the YAML's `command` (`... -m experiments.NAME ...`) or `program`."""
    command = [str(c) for c in config.get("command") or []]
    if "-m" in command and command.index("-m") + 1 < len(command):
        return command[command.index("-m") + 1]
    program = str(config.get("program", ""))
    if program.endswith(".py"):
        return program[:-3].replace("/", ".")
    raise ValueError(f"{path}: `command` must run `python -m experiments.NAME ${{args}}`")


def experiment(module_name: str, path: str) -> Any:
    """The experiment module (its `CONFIG` class, with a tracking section, and its `algorithms` registry)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{path}: cannot import experiment {module_name!r}: {e}") from None
    cls = getattr(module, "CONFIG", None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and "tracking" in {f.name for f in dataclasses.fields(cls)}):
        raise ValueError(f"{path}: {module_name} should define CONFIG, its config dataclass with a tracking section")
    return module


def _candidates(spec: dict) -> list:
    """Values a parameter can take that we can check cheaply: listed values, bounds."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec[k] for k in ("min", "max") if k in spec]


def check_parameters(config: dict, module: Any, path: str) -> None:
    """Every parameter is a flag of the experiment (`inner-lr` or `inner_lr`) whose values it accepts
    (parsed with the command's literal flags; only errors about the parameter's own flag count)."""
    from wandb.sdk.launch.sweeps import utils

    cls, algorithms = module.CONFIG, getattr(module, "algorithms", None)
    fields = config_tree.all_leaves(cls, algorithms)
    command = [str(c) for c in config.get("command") or []]
    literal = [c for c in map(str, utils.create_sweep_command(list(command))) if c.startswith("--")]
    for name, spec in (config.get("parameters") or {}).items():
        field = name.replace("-", "_")
        if field not in fields:
            close = difflib.get_close_matches(field, fields, n=3)
            hint = f"did you mean {', '.join(n.replace('_', '-') for n in close)}?" if close else \
                f"see python -m {cls.__module__} --help"
            raise ValueError(f"{path}: parameter {name!r} is not a field of {cls.__name__} ({hint})")
        if not isinstance(spec, dict) or "parameters" in spec:
            raise ValueError(f"{path}: parameter {name!r}: expected value, values or a distribution "
                             "(nested parameters are not supported)")
        if fields[field].type is bool and not any(m in command for m in BOOL_SAFE_MACROS):
            raise ValueError(f"{path}: parameter {name!r} is a boolean flag: use ${{args_no_boolean_flags}} "
                             "in `command` (--flag / no flag), not ${args}")
        if fields[field].type is bool and fields[field].default is True and False in _candidates(spec):
            raise ValueError(f"{path}: parameter {name!r}: False cannot turn off a flag that defaults to "
                             f"True through wandb's macros; put --no-{name.replace('_', '-')} in `command`")
        for value in _candidates(spec):
            value = plain(value)
            if isinstance(value, (list, dict)):
                raise ValueError(f"{path}: parameter {name!r} value {value!r}: wandb passes it as "
                                 f"--{name}={value}; write tuples as a string, e.g. '40,40'")
            argv = ([flag_of(field)] if value else []) if fields[field].type is bool else \
                [f"{flag_of(field)}={value}"]
            try:
                cli.parse(cls, literal + argv, algorithms)
            except FlagError as e:
                if e.flag == flag_of(field):
                    raise ValueError(f"{path}: parameter {name!r} value {value!r}: {e}") from None


def validate(config: dict, path: str, engine: Any = None) -> type:
    """Schema (when the engine is installed) and parameters; returns the experiment's config class."""
    if engine is not None:
        violations = engine.schema_violations_from_proposed_config(config)
        if violations:
            raise ValueError(f"{path}: invalid sweep config: {'; '.join(' '.join(v.split()) for v in violations)}")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise ValueError(f"{path}: `parameters` must map at least one config field to its values")
    module = experiment(experiment_module(config, path), path)
    check_parameters(config, module, path)
    return module.CONFIG


def expand(config: dict, params: dict[str, Any]) -> list[str]:
    """The trial's command line: the YAML's `command` with wandb's macros, Python for `python`."""
    from wandb.sdk.launch.sweeps import utils

    macros = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[str(config.get("program", ""))])
    command: list[str] = []
    for part in utils.create_sweep_command(list(config.get("command") or utils.DEFAULT_SWEEP_COMMAND)):
        part = str(part)
        if part.startswith("${") and part.endswith("}"):
            command += [str(v) for v in macros.get(part[2:-1], [])]
        else:
            command.append(sys.executable if part in ("python", "python3") else part)
    if command and command[0] == "/usr/bin/env":
        command = command[1:]
    return command
