"""Atomic checkpoints of any pytree (Equinox serialisation + temp file + rename, SHA-256 sidecar), the
`Checkpointer` that `maml.fit` writes them with, and parameter hashes.

How files are written is a value, `write(path, data)` (`atomic_write_bytes` by default), so that a test can
hand in one that fails like a full disk. A checkpoint that cannot be written leaves nothing of itself behind
and raises `CheckpointWriteError`; the checkpoints before it stay the newest complete ones."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, TypeVar

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

T = TypeVar("T")
_NAME = re.compile(r"^ckpt_(\d{9})\.eqx$")
Write = Callable[[Path, bytes], None]
"""How a file is written: `write(path, data)`, atomically (readers see the old file or the new one)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (one line naming the file and why)."""


class CorruptCheckpoint(CheckpointError):
    """The file's bytes do not match the SHA-256 recorded beside it (truncated, or overwritten)."""


class IncompatibleCheckpoint(CheckpointError):
    """An intact checkpoint of another structure (another model, config or train state)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only folder: `errno` says which); nothing of
    it is left and the earlier checkpoints are kept. One line naming the file and the newest one kept."""

    def __init__(self, path: Path, cause: OSError, newest: Optional[int]):
        kept = f"the newest complete checkpoint (step {newest}) is kept" if newest is not None else \
            "there is no earlier checkpoint"
        super().__init__(cause.errno, f"could not write checkpoint {path} ({cause.strerror or cause}); {kept}; "
                                      "free some space and run the same command to resume")

    def __str__(self) -> str:
        return self.strerror


def params_sha256(tree: PyTree) -> str:
    """SHA-256 of the array leaves of `tree` (dtype, shape and bytes, in leaf order)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        a = np.asarray(leaf)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or an interrupt: leave no partial temp file behind
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(directory: Path, step: int, tree: PyTree, keep: int = 3,
                    write: Write = atomic_write_bytes) -> Path:
    """Save `tree` as `directory/ckpt_<step>.eqx` with `write` (atomic), with a sidecar JSON holding its SHA-256.

    Keeps the newest `keep` checkpoints. A checkpoint counts only once its sidecar is written. If writing
    fails (`OSError`: a full disk...), the new checkpoint's files are removed, the older ones kept, and
    `CheckpointWriteError` raised.
    """
    directory = Path(directory)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    data = buf.getvalue()
    path = directory / f"ckpt_{step:09d}.eqx"
    meta = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write(path, data)
        write(path.with_suffix(".json"), json.dumps(meta).encode())
    except OSError as e:
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        complete = list_checkpoints(directory)
        raise CheckpointWriteError(path, e, int(_NAME.match(complete[-1].name).group(1)) if complete else None) from e
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Completed checkpoints in `directory` (with a sidecar), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.with_suffix(".json").exists()]
    return sorted(found)


def load_checkpoint(path: Path, like: T) -> T:
    """Load a checkpoint into the structure of `like`.

    Raises `CorruptCheckpoint` if its bytes do not match its sidecar's SHA-256, `IncompatibleCheckpoint`
    if it holds another structure (both name the file)."""
    path = Path(path)
    data = path.read_bytes()
    meta = json.loads(path.with_suffix(".json").read_text())
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its SHA-256 does not match {path.with_suffix('.json').name}")
    try:
        return eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as e:  # shape/structure mismatch from another model or experiment
        raise IncompatibleCheckpoint(f"checkpoint {path} does not fit this model/config: {e}") from None


def latest_checkpoint(directory: Path, like: T) -> Optional[tuple[int, T]]:
    """The newest loadable checkpoint as `(step, tree)`, falling back past corrupt ones (with a warning);
    None if there is none. An intact checkpoint of another structure raises `IncompatibleCheckpoint`."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return int(_NAME.match(path.name).group(1)), load_checkpoint(path, like)
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """Where and how often `maml.fit` checkpoints: `directory/ckpt_<step>.eqx` every `every` steps (and at
    the end, and when a SIGTERM / Ctrl-C arrives), keeping the newest `keep`.

    `restore(state)` is the newest checkpoint in the folder (or `state` when there is none): `fit` starts
    from it, so running the same command again resumes. `write` writes each file (atomically; a test may
    pass one that fails like a full disk).
    """

    directory: Path
    every: int
    keep: int = 3
    write: Write = atomic_write_bytes

    def __post_init__(self):
        for name in ("every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Checkpointer: {name}={value!r}; expected a positive integer")
        object.__setattr__(self, "directory", Path(self.directory))

    def restore(self, state: T) -> tuple[Optional[int], T]:
        """`(step of the checkpoint, state)` from the newest loadable checkpoint; `(None, state)` if none."""
        found = latest_checkpoint(self.directory, state)
        return (None, state) if found is None else found

    def save(self, step: int, state: PyTree) -> Path:
        return save_checkpoint(self.directory, step, state, keep=self.keep, write=self.write)
