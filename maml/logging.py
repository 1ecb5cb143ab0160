"""Experiment loggers behind one small interface, and a reader for wandb's offline run files.

A logger is a value the caller constructs and hands around; the library has no flags of its own:

    logger = MultiLogger(ConsoleLogger(), WandbLogger(mode="offline", project="maml", dir=out))
    logger.log_config(config_dict)
    fit(..., on_chunk=logger.on_chunk)          # the training curve, one row per compiled chunk
    logger.log_scalars(step, {"test/mse": 0.3})
    logger.log_image("fits", "fits.png")
    logger.log_summary(results)
    logger.finish()

`read_offline_run(path)` reads back what a `WandbLogger` wrote in offline mode (config, history,
summary, exit code) without a server; `find_offline_runs(folder)` lists such runs.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

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

    def on_chunk(self, step: int, metrics: Mapping[str, Any]) -> None:
        """`fit`'s `on_chunk` callback: the chunk's mean metrics as `train/NAME` at `step`."""
        self.log_scalars(step, chunk_scalars(metrics))

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

    def finish(self, exit_code: int = 0, timeout: float = 60.0) -> None:
        """Finish the run (once; later calls do nothing); offline, wait (up to `timeout` s) until its file
        is complete on disk."""
        if self._finished:
            return
        self._finished = True
        offline = self.run.settings.mode == "offline"
        run_dir = self.run_dir
        self.run.finish(exit_code=exit_code)
        deadline = time.monotonic() + timeout
        while offline and time.monotonic() < deadline:  # wandb-core may still be flushing the file
            try:
                if read_offline_run(run_dir).exit_code is not None:
                    return
            except ValueError:
                pass
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# Reading offline run files: wandb's transaction log (LevelDB log format of protobuf `Record`s).

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = [zlib.crc32(bytes([t])) for t in range(5)]


@dataclasses.dataclass
class OfflineRun:
    """What one offline wandb run recorded. `exit_code` is None when the run never finished."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    exit_code: Optional[int] = None

    def scalars(self, key: str) -> list[tuple[int, float]]:
        """`(step, value)` for each history row holding `key`."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def _records(data: bytes) -> Iterator[bytes]:
    """Payloads of the log's records; stops quietly at a torn tail (a run still being written)."""
    if not data.startswith(_HEADER):
        raise ValueError(f"not a wandb run file: header {data[:7]!r}")
    pos, parts = len(_HEADER), b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        if kind not in range(1, 5) or len(payload) < length:
            return
        if zlib.crc32(payload, _TYPE_CRC[kind]) & 0xFFFFFFFF != checksum:
            return
        pos += 7 + length
        parts = payload if kind in (_FULL, _FIRST) else parts + payload
        if kind in (_FULL, _LAST):
            yield parts


def _set(tree: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = json.loads(item.value_json)


def _remove(tree: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        tree = tree.get(k, {})
    tree.pop(keys[-1], None)


def _config(update: Any, config: dict) -> None:
    for item in update.update:
        _set(config, item)
    for item in update.remove:
        _remove(config, item)


def read_offline_run(path: Union[str, Path]) -> OfflineRun:
    """Read a `run-ID.wandb` file, or the run folder holding one (config without wandb's `_wandb`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise ValueError(f"read_offline_run: no run-*.wandb file in {str(path)!r}")
        path = found[0]
    run = OfflineRun(path=path)
    for payload in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.name, run.job_type, run.tags = r.display_name, r.job_type, tuple(r.tags)
            _config(r.config, run.config)
        elif kind == "config":
            _config(record.config, run.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item)
            for item in record.summary.remove:
                _remove(run.summary, item)
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    for key in ("_wandb", "_runtime", "_timestamp", "_step"):
        run.summary.pop(key, None)
    return run


def find_offline_runs(folder: Union[str, Path], run_id: Optional[str] = None) -> list[Path]:
    """Offline run folders under `folder` (searched recursively), oldest first; optionally one run id."""
    pattern = f"offline-run-*-{run_id}" if run_id else "offline-run-*"
    return sorted((p for p in Path(folder).rglob(pattern) if p.is_dir()), key=lambda p: p.name)


__all__: Sequence[str] = (
    "AbstractLogger", "ConsoleLogger", "MultiLogger", "OfflineRun", "WandbLogger", "chunk_scalars",
    "find_offline_runs", "flatten", "read_offline_run",
)
