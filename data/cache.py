"""The tfds cache as several processes share it: one builds, the others wait and read; a corrupt one is rebuilt.

    splits = cache.build_and_read(make_builder, download_config, read, cache_dir=..., name=..., dataset=...)

Building and reading happen under an exclusive `fcntl.flock` of `CACHE/.NAME.lock`, so that processes
given the same fresh cache (two experiments, the processes of a multi-host run) never build at once: the
first builds, the others wait (one line saying so) and then read what it built. Before building, the
temporary folders a killed build left behind are removed. `read(builder)` reads every record back, which
detects a truncated, corrupt or missing array_record shard (Riegeli's chunk hashes and footers, the shard
lengths of dataset_info.json): such a cache is rebuilt once, with a one-line warning. A cache still
unreadable after building, or whose dataset_info.json is corrupt, is a one-line ValueError.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import tensorflow_datasets as tfds
from google.protobuf import json_format

B = TypeVar("B", bound=tfds.core.DatasetBuilder)
T = TypeVar("T")
# What array_record raises reading a truncated or corrupt shard (RuntimeError from Riegeli) or a missing one.
UNREADABLE = (RuntimeError, OSError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def locked(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive flock of `path` (created if absent) while the block runs; print `waiting` on stderr
    when another process holds it first. The kernel releases it when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _leftovers(builder: tfds.core.DatasetBuilder) -> list[Path]:
    """Temporary folders of earlier builds of `builder` that did not finish (tfds renames them when done)."""
    folder = Path(builder.data_dir).parent
    return sorted(folder.glob("incomplete.*")) if folder.is_dir() else []


def build_and_read(make: Callable[[], B], download_config: tfds.download.DownloadConfig, read: Callable[[B], T], *,
                   cache_dir: os.PathLike | str, name: str, dataset: str) -> T:
    """`read(builder)` of the builder `make()` gives (over `cache_dir`), building it first if needed; one
    process at a time per `name` (the builder's). A prepared cache that `read` cannot read is rebuilt."""
    cache = Path(cache_dir)
    with locked(cache / f".{name}.lock", f"{dataset}: another process is building or reading the tfds cache in "
                                         f"{cache}; waiting for it"):
        try:
            builder = make()
        except json_format.Error as e:  # dataset_info.json, read when the builder is made
            raise ValueError(f"{dataset}: the tfds cache in {cache} is corrupt ({_first_line(e)}); delete "
                             f"{cache / name} to rebuild it") from None
        if builder.is_prepared():
            try:
                return read(builder)
            except UNREADABLE as e:
                print(f"warning: {dataset}: the tfds cache {builder.data_dir} is corrupt ({_first_line(e)}); "
                      "rebuilding it", file=sys.stderr, flush=True)
            shutil.rmtree(builder.data_dir)
            builder = make()
        for folder in _leftovers(builder):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{dataset}: building the tfds cache {builder.data_dir} (once)", file=sys.stderr, flush=True)
        builder.download_and_prepare(download_config=download_config)
        try:
            return read(builder)
        except UNREADABLE as e:
            raise ValueError(f"{dataset}: the tfds cache {builder.data_dir} is unreadable right after building it "
                             f"({_first_line(e)}); check the disk") from None
