"""Run a wandb sweep of an experiment: online with wandb's server, or offline with the same engine.

    python -m launch.sweep launch/sweeps/sinusoid_grid.yaml --count 12            # online: wandb.sweep + agent
    python -m launch.sweep launch/sweeps/sinusoid_grid.yaml --count 4 --offline  # local, no network

Online creates the sweep on the server (an API key is needed) and runs an agent here; more agents can
join with `wandb agent ENTITY/PROJECT/SWEEP_ID`. Offline drives the same YAML with the `sweeps` package,
the search engine behind wandb's controller (grid, random, bayes, hyperband early termination): each
suggested command runs as a subprocess with an offline wandb run (OUT/wandb/offline-run-*-ID, read back
for its metric and history and fed to the engine), writing to OUT/ID; a trial that crashes is recorded as
failed and the sweep goes on; OUT/sweep.json lists the trials. Upload the runs later with `wandb sync`.

Before anything runs, the YAML is checked against the engine's schema, and every parameter against the
experiment's config (`python -m experiments.NAME` in `command`; the config is its dataclass inheriting
`CONFIG` with a tracking section): any problem is one line `error: ...` and exit status 2.

The offline engine is the `sweeps` package (in the `dev` and `sweeps` extras): version 0.2.0 installs
alongside numpy 2; later versions declare numpy<2 but run on numpy 2, so install them with
`pip install --no-deps sweeps==0.3.0` (their other requirements are in the `sweeps` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from experiments import cli, tracking
from launch.offline_runs import find_offline_runs, read_offline_run
from launch.sweep_config import expand, load_config, plain, validate
from maml.training.loggers import flatten

def load_sweeps() -> Any:
    """The `sweeps` engine, or a ValueError saying how to install it."""
    try:
        with warnings.catch_warnings():  # 0.2.0 uses pydantic's deprecated class-based config
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError:
        raise ValueError("--offline needs the `sweeps` engine: pip install -e '.[sweeps]' "
                         "(or pip install --no-deps sweeps==0.3.0)") from None
    return sweeps


def new_run_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def sweep_run(engine: Any, name: str, state: str, params: dict, history: list, summary: Optional[dict] = None,
              **extra: Any) -> Any:
    """An engine `SweepRun`, by the field aliases that every `sweeps` version accepts (wandb's names)."""
    return engine.SweepRun(name=name, state=engine.RunState(state), config={k: {"value": v} for k, v in params.items()},
                           sampledHistory=history, summaryMetrics=summary or {}, **extra)


def read_trial(root: Path, run_id: str, wait: float = 0.0) -> Any:
    """The trial's offline run as read so far (waiting up to `wait` s for its exit record), or None before
    wandb wrote it."""
    found = find_offline_runs(root / "wandb", run_id)
    if not found or not list(found[-1].glob("run-*.wandb")):
        return None
    try:
        return read_offline_run(found[-1], wait=wait)
    except ValueError:  # created but no header written yet
        return None


def run_trial(config: dict, engine: Any, runs: list, params: dict, root: Path, *, poll: float) -> dict:
    """Run one suggested configuration to its end (or early stop); returns its record."""
    run_id = new_run_id()
    swept = {k.replace("-", "_") for k in params}
    command = expand(config, params)
    if "out" not in swept:
        command.append(f"--out={root / run_id}")
    if config.get("project") and "wandb_project" not in swept:
        command.append(f"--wandb-project={config['project']}")
    param_file = root / "params" / f"config-{run_id}.yaml"
    param_file.parent.mkdir(parents=True, exist_ok=True)
    param_file.write_text(yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in params.items()}}))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SWEEP_ID",)}
    env.setdefault("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", str(max(poll, 0.1)))  # live history
    env.update(WANDB_MODE="offline", WANDB_RUN_ID=run_id, WANDB_DIR=str(root),
               WANDB_SWEEP_PARAM_PATH=str(param_file), WANDB_RUN_GROUP=env.get("WANDB_RUN_GROUP", root.name))
    log = root / "logs" / f"{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    stopped, start = False, time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(poll)
                if config.get("early_terminate") and not stopped:
                    current = read_trial(root, run_id)
                    if current is not None and current.history:
                        running = sweep_run(engine, run_id, "running", params, [flatten(r) for r in current.history])
                        if any(r.name == run_id for r in engine.stop_runs(config, runs + [running])):
                            stopped = True
                            proc.terminate()
        finally:
            if proc.poll() is None:  # the driver was interrupted: let the trial finish its wandb run
                proc.terminate()
            code = proc.wait()
    stopped = stopped and code != 0  # a trial that finished before the signal is not stopped
    trial = read_trial(root, run_id, wait=10.0)
    state = "finished" if code == 0 or stopped else "failed"
    summary = flatten(trial.summary) if trial else {}
    metric = (config.get("metric") or {}).get("name")
    return {"run_id": run_id, "params": params, "state": state, "stopped": stopped, "exit_code": code,
            "metric": summary.get(metric) if metric else None, "seconds": round(time.monotonic() - start, 1),
            "run_dir": str(trial.path.parent) if trial else None, "log": str(log), "command": command,
            "summary": summary, "history": [flatten(r) for r in trial.history] if trial else []}


def offline(config: dict, engine: Any, count: int, root: Path, *, poll: float = 2.0) -> list[dict]:
    """Drive the sweep locally for `count` trials (fewer when a grid runs out); returns the trials."""
    config = engine.SweepConfig(config)
    root.mkdir(parents=True, exist_ok=True)
    runs: list = []
    trials: list[dict] = []
    for i in range(count):
        suggestion = engine.next_run(config, runs)
        if suggestion is None:
            print(f"sweep: grid exhausted after {i} trials", file=sys.stderr)
            break
        params = {k: plain(v["value"]) for k, v in suggestion.config.items()}
        trial = run_trial(config, engine, runs, params, root, poll=poll)
        runs.append(sweep_run(engine, trial["run_id"], trial["state"], params, trial.pop("history"),
                              trial.pop("summary"), stopped=trial["stopped"], exitcode=trial["exit_code"]))
        trials.append(trial)
        (root / "sweep.json").write_text(json.dumps({"config": plain(dict(config)), "trials": trials}, indent=2))
        shown = " ".join(f"{k}={v}" for k, v in params.items())
        print(f"trial {i + 1}/{count} {trial['run_id']} {trial['state']}"
              f"{' (stopped early)' if trial['stopped'] else ''} {shown} -> {trial['metric']}", file=sys.stderr)
    return trials


def online(config: dict, count: Optional[int], project: Optional[str], entity: Optional[str]) -> None:
    """Create the sweep on the wandb server and run an agent here."""
    if not tracking.api_key_configured():
        raise ValueError("online sweeps need a wandb API key (WANDB_API_KEY or `wandb login`); "
                         "use --offline to sweep locally")
    import wandb

    project = project or config.get("project") or "maml-jax"
    sweep_id = wandb.sweep(config, project=project, entity=entity)
    wandb.agent(sweep_id, project=project, entity=entity, count=count)


def main(argv: Optional[Sequence[str]] = None) -> Optional[list[dict]]:
    parser = cli._Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="sweep YAML (launch/sweeps/*.yaml)")
    parser.add_argument("--count", type=int, default=None, help="trials to run (offline default: 10)")
    parser.add_argument("--offline", action="store_true", help="drive the sweep locally, no server")
    parser.add_argument("--out", default=None, help="offline: folder of the trials (default: runs/sweeps/NAME)")
    parser.add_argument("--project", default=None, help="wandb project (default: the YAML's, else maml-jax)")
    parser.add_argument("--entity", default=None, help="wandb entity (online)")
    parser.add_argument("--check", action="store_true", help="validate the YAML and the parameters, run nothing")
    parser.add_argument("--poll", type=float, default=2.0, help="offline: seconds between early-termination checks")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count={args.count}; expected a positive integer")
    config = load_config(args.config)
    if args.project:
        config["project"] = args.project
    engine = load_sweeps() if args.offline else _maybe_sweeps()
    cls = validate(config, args.config, engine)
    if args.check:
        print(f"{args.config}: ok ({config['method']} over {', '.join(config['parameters'])} of {cls.__name__}"
              f"{'' if engine else '; schema not checked: the sweeps engine is not installed'})")
        return None
    if not args.offline:
        online(config, args.count, args.project, args.entity)
        return None
    name = Path(args.config).stem
    root = Path(args.out or f"runs/sweeps/{name}").resolve()
    return offline(config, engine, args.count or 10, root, poll=args.poll)


def _maybe_sweeps() -> Any:
    try:
        return load_sweeps()
    except ValueError:
        return None  # online: the server validates the schema


if __name__ == "__main__":
    cli.run(main)
