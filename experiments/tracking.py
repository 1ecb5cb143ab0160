"""Experiment tracking for every experiment: a config section (the `--wandb ...` flags) and a few calls.

Wiring an experiment (see experiments/sinusoid.py and experiments/session.py):

    tracking: tracking.TrackingConfig = section(tracking.TrackingConfig)     # the --wandb* flags
    config = tracking.prepare(cli.parse(MyConfig, argv, algorithms))        # checks them; per-trial OUT in sweeps
    logger = tracking.start(config.tracking, to_flat(config), out, job="my_experiment")   # config logged
    maml.fit(..., hooks=[logger.hook(every=N)])                             # training curve (train/meta_loss)
    logger.log_scalars(step, {"val/accuracy": acc})                          # anything else, e.g. validation
    tracking.finish(logger, results, images=[out / "fits.png"])             # test metrics, plots, summary

wandb mode: `--wandb online|offline|disabled`; by default WANDB_MODE when set, else online when an API
key is configured (WANDB_API_KEY or a .netrc entry from `wandb login`) and offline otherwise, so nothing
ever prompts. Offline runs are written to OUT/wandb (or --wandb-dir, or WANDB_DIR); upload them with
`wandb sync OUT/wandb/offline-run-*`. Under a wandb sweep agent (WANDB_SWEEP_ID and WANDB_RUN_ID set),
each trial writes to OUT/RUN_ID so that trials never share an output folder.
"""

from __future__ import annotations

import dataclasses
import math
import netrc
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar
from urllib.parse import urlparse

from experiments.config import flag
from maml import AbstractLogger, ConsoleLogger, MultiLogger, WandbLogger, atomic_write_bytes
from maml.training.loggers import MODES, flatten

C = TypeVar("C")


def _f(default, help):  # none of these changes the computation: resumable
    return flag(default, help, resumable=True)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking with Weights & Biases."""

    wandb: Optional[str] = _f(None, "wandb mode: online, offline or disabled (default: WANDB_MODE, "
                                    "else online with an API key configured, else offline)")
    wandb_project: str = _f("maml-jax", "wandb project")
    wandb_entity: Optional[str] = _f(None, "wandb entity (user or team; default: yours)")
    wandb_group: Optional[str] = _f(None, "wandb run group (default: WANDB_RUN_GROUP)")
    wandb_name: Optional[str] = _f(None, "wandb run name (default: wandb's)")
    wandb_tags: tuple[str, ...] = _f((), "wandb run tags")
    wandb_dir: Optional[str] = _f(None, "folder for wandb's run files (default: WANDB_DIR, else OUT)")


def api_key_configured() -> bool:
    """Whether wandb would find credentials without prompting (env variables or .netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: Optional[str]) -> str:
    """The wandb mode from `--wandb`, then WANDB_MODE, then whether an API key is configured."""
    aliases = {"dryrun": "offline", "run": "online"}
    if mode is None:
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env:
            return resolve_mode(aliases.get(env, env))
        return "online" if api_key_configured() else "offline"
    if mode not in MODES:
        raise ValueError(f"--wandb={mode!r}; expected one of {', '.join(MODES)}")
    if mode == "online" and not api_key_configured():
        raise ValueError("--wandb=online needs an API key (WANDB_API_KEY or `wandb login`); "
                         "use --wandb offline and upload later with `wandb sync`")
    return mode


def prepare(config: C) -> C:
    """Check the tracking section; under a sweep agent, give the trial its own `out` (OUT/RUN_ID)."""
    resolve_mode(config.tracking.wandb)
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    out = getattr(config, "out", None)
    if sweep and run_id and out is not None and Path(out).name != run_id:
        config = dataclasses.replace(config, out=str(Path(out) / run_id))
    return config


def start(config: TrackingConfig, flat_config: Mapping[str, Any], out: Path, *, job: str,
          console_every: int = 1) -> AbstractLogger:
    """The run's logger (console, plus wandb unless disabled), with `flat_config` already logged."""
    mode = resolve_mode(config.wandb)
    console = ConsoleLogger(every=console_every)
    if mode == "disabled":
        return console
    run_dir = config.wandb_dir or os.environ.get("WANDB_DIR") or str(out)
    # A resumed run continues the same wandb run: its id is kept beside the checkpoints (unless a sweep
    # agent assigns the id).
    id_file = Path(out) / "wandb_run_id"
    resume = {}
    if "WANDB_RUN_ID" not in os.environ and id_file.exists():
        resume = {"id": id_file.read_text().strip(), "resume": "allow"}
    wandb = WandbLogger(
        mode=mode, dir=run_dir, project=config.wandb_project, entity=config.wandb_entity,
        group=config.wandb_group, name=config.wandb_name, tags=list(config.wandb_tags) or None,
        job_type=job, config=dict(flat_config), **resume,
    )
    if "WANDB_RUN_ID" not in os.environ:
        atomic_write_bytes(id_file, wandb.run.id.encode())
    print(f"wandb: {mode} run {wandb.run.id} in {wandb.run_dir}", file=sys.stderr)
    _exit_on_sigterm()
    return MultiLogger(console, wandb)


def _exit_on_sigterm() -> None:
    """SIGTERM (a sweep stopping the run) exits through Python, so wandb finishes the run (exit 143)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)


def finish(logger: AbstractLogger, results: Mapping[str, Any], *, step: Optional[int] = None,
           images: Sequence[Path] = ()) -> None:
    """Log the results' numbers (but its `config`) as scalars (`mse/1`) at `step` (default: the
    results' `meta_iterations`), `images` (named by file stem), `results` as the summary; finish."""
    numbers = {k: v for k, v in flatten({k: v for k, v in results.items() if k != "config"}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if step is None:
        step = int(results.get("meta_iterations", 0))
    if numbers:
        logger.log_scalars(step, numbers)
    for path in images:
        if Path(path).exists():
            logger.log_image(Path(path).stem, Path(path), step)
    logger.log_summary(results)
    logger.finish()
