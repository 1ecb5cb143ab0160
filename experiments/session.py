"""What every experiment does around its own work: on process 0, the output folder (checked against a
run already there: resume; locked against a second run while this one runs) and the logger; at the end,
results.json (written atomically), the logger's summary and one line on stdout. Other processes compute
the same and write nothing. Also the run's clock and its time budget (`budget_hook`), a decision all
processes take together.

    with session.run(config, job="sinusoid") as run:       # after runtime.initialize(config.runtime)
        ...                                                  # run.out, run.hooks(every), run.log(...)
        run.finish(results, images=[run.out / "fits.png"], show=("mse", "params_sha256"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

import maml
from experiments import cli, runtime, tracking
from experiments.config import flag, section
from experiments.config_tree import to_flat


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """What every experiment's config has besides its own sections: devices and processes, tracking, the
    progress bar (subclasses add their sections and `out`)."""

    runtime: runtime.RuntimeConfig = section(runtime.RuntimeConfig)
    tracking: tracking.TrackingConfig = section(tracking.TrackingConfig)
    progress: bool = flag(True, "show a progress bar", resumable=True)


@dataclasses.dataclass
class Session:
    """One run of an experiment in this process: `out` (its folder) and `logger` (None except on process 0)."""

    out: Path
    logger: Optional[maml.AbstractLogger]

    @property
    def writer(self) -> bool:
        """Whether this process writes files and logs (process 0)."""
        return self.logger is not None

    def hooks(self, every: int) -> list[maml.Hook]:
        """`maml.fit` hooks logging the training curve every `every` steps (none off process 0)."""
        return [self.logger.hook(every)] if self.logger is not None else []

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_scalars(step, scalars)

    def finish(self, results: dict, *, images: Sequence[Path] = (), show: Sequence[str] = ()) -> None:
        """On process 0: write results.json, log the results and images, finish the logger, print `show`."""
        if self.logger is None:
            return
        maml.atomic_write_bytes(self.out / "results.json", json.dumps(results, indent=2).encode())
        tracking.finish(self.logger, results, images=images)
        print(json.dumps({k: results[k] for k in show}))


@contextlib.contextmanager
def run(config: Any, *, job: str, console_every: int = 1) -> Iterator[Session]:
    """The session of `config` (a root config with `out` and a `tracking` section). A body that raises
    finishes the wandb run as failed (never left open for the next run of this process)."""
    if not runtime.is_writer():
        yield Session(Path(config.out), None)
        return
    with cli.run_folder(config.out, config) as out:
        logger = tracking.start(config.tracking, to_flat(config), out, job=job, console_every=console_every)
        with logger:
            yield Session(out, logger)


def _process0(flag_: bool) -> bool:
    """`flag_` of process 0, on every process (a decision all of them must take together)."""
    if jax.process_count() == 1:
        return flag_
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag_)))


@dataclasses.dataclass
class Clock:
    """Wall-clock seconds of this run: since the start, and spent validating."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    validation: float = 0.0

    def training(self) -> float:
        return time.perf_counter() - self.start - self.validation


def budget_hook(max_minutes: Optional[float], every: int, clock: Clock) -> maml.Hook:
    """At each validation past `max_minutes` (decided by process 0 for all): stop training."""

    def late(info: maml.StepInfo) -> Optional[maml.Stop]:
        over = max_minutes is not None and time.perf_counter() > clock.start + 60 * max_minutes
        return maml.Stop("max_minutes") if _process0(over) else None

    return maml.Hook(late, every, at_end=False)
