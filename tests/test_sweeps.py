"""Sweep YAMLs pass the engine's schema; bad YAMLs fail in one line; an offline sweep runs for real."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch import sweep, sweep_config
from launch.offline_runs import read_offline_run
from test_logging import toy  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted((REPO / "launch" / "sweeps").glob("*.yaml"))
engine = pytest.importorskip("sweeps", reason="the sweeps engine is in the dev extra")

def write_yaml(folder: Path, config: dict) -> str:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def toy_sweep(**changes) -> dict:
    config = {"method": "grid", "metric": {"name": "loss", "goal": "minimize"},
              "command": ["${env}", "python", "-m", "toyexp", "${args}"],
              "parameters": {"lr": {"values": [0.1, 0.2, 0.3, 0.9]}}}
    config.update(changes)
    return config


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_sweep_yamls_pass_the_engine_schema(path):
    config = yaml.safe_load(path.read_text())
    assert engine.schema_violations_from_proposed_config(config) == []
    filled = engine.SweepConfig(config)
    assert engine.next_run(filled, []) is not None
    module = importlib.import_module(sweep_config.experiment_module(config, str(path)))
    assert sweep_config.validate(config, str(path), engine) is module.CONFIG  # every parameter is one of its flags


@pytest.mark.parametrize("change, message", [
    ({"method": "gird"}, r"invalid sweep config: 'gird' is not one of"),
    ({"parameters": {"lrr": {"values": [0.1]}}}, r"parameter 'lrr' is not a field of ToyConfig"),
    ({"parameters": {"steps": {"values": [1, "many"]}}}, r"parameter 'steps' value 'many': .*--steps='many'; expected int"),
    ({"command": ["python", "train.py"]}, r"`command` must run `python -m experiments.NAME"),
])
def test_invalid_yaml_is_one_clear_error(toy, change, message):
    path = write_yaml(toy, toy_sweep(**change))
    with pytest.raises(ValueError, match=message) as info:
        sweep.main([path, "--offline", "--count", "2", "--out", str(toy / "out")])
    assert "\n" not in str(info.value)
    assert not (toy / "out").exists()


def test_invalid_yaml_cli_prints_one_line_and_runs_nothing(toy):
    path = write_yaml(toy, toy_sweep(method="gird"))
    proc = subprocess.run([sys.executable, "-m", "launch.sweep", path, "--offline", "--out", str(toy / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not (toy / "out").exists()


def test_engine_values_become_plain_flags():
    params = {"inner-lr": np.float64(0.25), "inner-steps": np.int64(3), "first-order": True}
    params = {k: sweep_config.plain(v) for k, v in params.items()}
    assert [type(v) for v in params.values()] == [float, int, bool]
    command = sweep_config.expand({"command": ["${env}", "python", "-m", "x", "${args_no_boolean_flags}"]}, params)
    assert command == [sys.executable, "-m", "x", "--inner-lr=0.25", "--inner-steps=3", "--first-order"]


def test_online_without_api_key_is_one_clear_error(toy):
    path = write_yaml(toy, toy_sweep())
    with pytest.raises(ValueError, match="online sweeps need a wandb API key"):
        sweep.main([path, "--count", "1"])


def test_bayes_suggestions_are_plain_numbers():
    config = engine.SweepConfig(toy_sweep(method="bayes", parameters={"lr": {"min": 0.0, "max": 0.5},
                                                                      "steps": {"values": [1, 2]}}))
    runs = []
    for i in range(3):
        suggestion = engine.next_run(config, runs)
        params = {k: sweep_config.plain(v["value"]) for k, v in suggestion.config.items()}
        assert type(params["lr"]) is float and type(params["steps"]) is int
        runs.append(sweep.sweep_run(engine, f"r{i}", "finished", params, [], {"loss": params["lr"]}))
    assert [r.summary_metric("loss") for r in runs] == [r.config["lr"]["value"] for r in runs]


@pytest.mark.slow
def test_offline_sweep_runs_four_trials_one_crashing_one_stopped(toy):
    """Grid of 4: two finish, the third is stopped early by hyperband (worse than both at every band),
    the fourth crashes; all four are distinct configurations and the sweep goes on past the crash."""
    out = toy / "sweep"
    config = toy_sweep(parameters={"lr": {"values": [0.3, 0.2, 0.1, 0.9]}, "steps": {"value": 10},
                                   "sleep": {"value": 0.5}},
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    trials = sweep.main([write_yaml(toy, config), "--offline", "--count", "4", "--out", str(out), "--poll", "0.25"])
    assert [t["params"]["lr"] for t in trials] == [0.3, 0.2, 0.1, 0.9]
    assert [(t["state"], t["stopped"]) for t in trials] == [("finished", False), ("finished", False),
                                                             ("finished", True), ("failed", False)]
    assert [t["exit_code"] == 0 for t in trials] == [True, True, False, False]
    for trial in trials[:2]:
        run = read_offline_run(trial["run_dir"])
        assert run.exit_code == 0 and run.run_id == trial["run_id"]
        assert run.config["lr"] == trial["params"]["lr"] and run.config["out"] == str(out / trial["run_id"])
        results = json.loads((out / trial["run_id"] / "results.json").read_text())
        assert trial["metric"] == run.summary["loss"] == results["loss"]
        assert [v for _, v in run.scalars("loss")] == [10 * (trial["params"]["lr"] - 0.3) ** 2 + 1 / s
                                                       for s in range(1, 11)]
    stopped = read_offline_run(trials[2]["run_dir"])
    assert 2 <= len(stopped.scalars("loss")) < 10
    crashed = read_offline_run(trials[3]["run_dir"])
    assert crashed.exit_code != 0 and "toy crash" in Path(trials[3]["log"]).read_text()
    saved = json.loads((out / "sweep.json").read_text())
    assert [t["run_id"] for t in saved["trials"]] == [t["run_id"] for t in trials]


def test_online_creates_the_sweep_and_runs_an_agent(toy, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wandb, "sweep", lambda config, **kw: calls.append(("sweep", config, kw)) or "abc123")
    monkeypatch.setattr(wandb, "agent", lambda sweep_id, **kw: calls.append(("agent", sweep_id, kw)))
    sweep.main([write_yaml(toy, toy_sweep(project="proj")), "--count", "3"])
    (_, config, kw), agent = calls
    assert config["method"] == "grid" and kw == {"project": "proj", "entity": None}
    assert agent == ("agent", "abc123", {"project": "proj", "entity": None, "count": 3})
