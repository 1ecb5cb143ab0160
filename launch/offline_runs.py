"""Reading wandb's offline run files without a server: the sweep driver's and the tests' view of a run.

`read_offline_run(path)` reads back what a `maml.WandbLogger` wrote in offline mode (config, history,
summary, exit code); `find_offline_runs(folder)` lists such runs. The file is wandb's transaction log:
the LevelDB log format holding protobuf `Record`s.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

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


def read_offline_run(path: Union[str, Path], *, wait: float = 0.0) -> OfflineRun:
    """Read a `run-ID.wandb` file, or the run folder holding one (config without wandb's `_wandb`).

    `wait`: seconds to keep re-reading while the run has no exit record yet (wandb's service may still be
    writing the file for a moment after `run.finish()`); the last reading is returned either way.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read(Path(path))
        if run.exit_code is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _read(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

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
    """Offline run folders under `folder` (searched recursively), oldest first; optionally one run id's.

    wandb names them offline-run-DATE_TIME-ID, with -N appended when that name was taken (a resumed run that
    starts within the same second as its previous part): ordered by time, then N."""
    tail = re.escape(run_id) if run_id else ".+?"
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{tail}(?:-(\d+))?")
    found = []
    for p in Path(folder).rglob("offline-run-*"):
        m = name.fullmatch(p.name)
        if p.is_dir() and m:
            found.append(((m[1], int(m[2] or 0)), p))
    return [p for _, p in sorted(found)]
