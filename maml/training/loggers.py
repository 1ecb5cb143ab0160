"""Experiment loggers behind one small interface.

A logger is a value the caller constructs and hands around; the library has no flags of its own:

    logger = MultiLogger(ConsoleLogger(), WandbLogger(mode="offline", project="maml", dir=out))
    logger.log_config(config_dict)
    fit(..., hooks=[logger.hook(every=1000)])   # the training curve: mean metrics every 1000 steps
    logger.log_scalars(step, {"test/mse": 0.3})
    logger.log_image("fits", "fits.png")
    logger.log_summary(results)
    logger.finish()
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .fit import Hook, StepInfo

Image = Union[str, Path, np.ndarray]
MODES = ("online", "offline", "disabled")


def flatten(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level: `{"mse": {"1": 0.3}} -> {"mse/1": 0.3}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat


def chunk_scalars(metrics: Mapping[str, Any], prefix: str = "train/") -> dict[str, float]:
    """Mean over the leading step axis of `fit`'s chunk metrics; vectors become `name/i` scalars."""
    out: dict[str, float] = {}
    for name, value in flatten(metrics).items():
        mean = np.asarray(value, dtype=np.float64)
        mean = mean.mean(axis=0) if mean.ndim else mean
        if mean.ndim == 0:
            out[prefix + name] = float(mean)
        else:
            out.update({f"{prefix}{name}/{i}": float(v) for i, v in enumerate(mean.ravel())})
    return out


class AbstractLogger(abc.ABC):
    """Log a run's config, scalars at a step, images, its summary; then `finish` it."""

    @abc.abstractmethod
    def log_config(self, config: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    @abc.abstractmethod
    def log_image(self, name: str, image: Image, step: Optional[int] = None) -> None: ...

    @abc.abstractmethod
    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def finish(self, exit_code: int = 0) -> None: ...

    def hook(self, every: int) -> Hook:
        """A `maml.fit` hook logging the mean metrics of the last `every` steps as `train/NAME`."""

        def log(info: StepInfo) -> None:
            if info.metrics:
                self.log_scalars(info.step, chunk_scalars(info.metrics))

        return Hook(log, every)

    def __enter__(self) -> "AbstractLogger":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """A run that raises is finished as failed (exit code 1, 130 for Ctrl-C, a SystemExit's code)."""
        if exc_type is None:
            return
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        self.finish(exit_code=code)


class ConsoleLogger(AbstractLogger):
    """Periodic lines on stdout (through tqdm, so `fit`'s progress bar stays intact)."""

    def __init__(self, *, every: int = 1, print_fn: Optional[Callable[[str], None]] = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"ConsoleLogger: every={every!r}; expected a positive integer")
        self.every = every
        self._calls = 0
        if print_fn is None:
            from tqdm.auto import tqdm

            print_fn = tqdm.write
        self._print = print_fn

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._calls += 1
        if self._calls % self.every == 0:
            self._print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def log_image(self, name: str, image: Image, step: Optional[int] = None) -> None:
        if isinstance(image, (str, Path)):
            self._print(f"{name}: {image}")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class MultiLogger(AbstractLogger):
    """Forward every call to each of `loggers`."""

    def __init__(self, *loggers: AbstractLogger):
        self.loggers = loggers

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(step, scalars)

    def log_image(self, name: str, image: Image, step: Optional[int] = None) -> None:
        for logger in self.loggers:
            logger.log_image(name, image, step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def finish(self, exit_code: int = 0) -> None:
        for logger in self.loggers:
            logger.finish(exit_code)


class WandbLogger(AbstractLogger):
    """A wandb run. `mode` is "online" or "offline" ("disabled" is a plain `ConsoleLogger`).

    Other keyword arguments go to `wandb.init` (project, entity, group, name, tags, job_type, dir,
    config). Steps must not decrease. wandb's own console capture and system metrics are off.
    """

    def __init__(self, *, mode: str, dir: Optional[Union[str, Path]] = None, **init_kwargs: Any):
        if mode not in ("online", "offline"):
            raise ValueError(f"WandbLogger: mode={mode!r}; expected 'online' or 'offline'")
        import wandb

        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        # create_new: never hand back another, still active run of this process (wandb's default does).
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True, reinit="create_new")
        # An absolute folder: wandb resolves a relative one later, against whatever the cwd is then.
        self.run = wandb.init(mode=mode, dir=None if dir is None else str(Path(dir).resolve()),
                              settings=settings, **init_kwargs)
        self._wandb = wandb
        self._finished = False

    @property
    def run_dir(self) -> Path:
        """The run's folder (`.../wandb/offline-run-DATE-ID` in offline mode)."""
        return Path(self.run.dir).parent

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def log_image(self, name: str, image: Image, step: Optional[int] = None) -> None:
        data = str(image) if isinstance(image, Path) else image
        self.run.log({name: self._wandb.Image(data)}, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(summary))

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (once; later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        self.run.finish(exit_code=exit_code)


__all__: Sequence[str] = ("AbstractLogger", "ConsoleLogger", "MultiLogger", "WandbLogger", "chunk_scalars", "flatten")
