"""Atomic checkpoints of any pytree (Equinox serialisation + temp file + rename, SHA-256 sidecar), the
`Checkpointer` that `maml.fit` writes them with, and parameter hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, TypeVar

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

T = TypeVar("T")
_NAME = re.compile(r"^ckpt_(\d{9})\.eqx$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (one line naming the file and why)."""


class CorruptCheckpoint(CheckpointError):
    """The file's bytes do not match the SHA-256 recorded beside it (truncated, or overwritten)."""


class IncompatibleCheckpoint(CheckpointError):
    """An intact checkpoint of another structure (another model, config or train state)."""


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(directory: Path, step: int, tree: PyTree, keep: int = 3) -> Path:
    """Save `tree` as `directory/ckpt_<step>.eqx` atomically, with a sidecar JSON holding its SHA-256.

    Keeps the newest `keep` checkpoints. A checkpoint counts only once its sidecar is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    data = buf.getvalue()
    path = directory / f"ckpt_{step:09d}.eqx"
    atomic_write_bytes(path, data)
    meta = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
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
    from it, so running the same command again resumes.
    """

    directory: Path
    every: int
    keep: int = 3

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
        return save_checkpoint(self.directory, step, state, keep=self.keep)
