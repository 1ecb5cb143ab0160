"""One run at a time in an output folder: `OUT/run.lock`, created atomically (`O_CREAT | O_EXCL`) and holding
the pid, host and start time of the run that holds it, removed when that run ends.

A second run on the same folder stops at once with a one-line `RunLocked` naming the first. A lock left by
a process that died (SIGKILL, a lost node) on this host is stale: it is taken over with a one-line warning.
A lock from another host cannot be checked from here; the message says how to remove it by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from experiments.config import FlagError

NAME = "run.lock"


class RunLocked(FlagError):
    """`--out` is in use by another run that is (or may be) still running."""


class Holder(NamedTuple):
    """The run holding a lock: its pid, host and start time (ISO 8601)."""

    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def this_run() -> Holder:
    return Holder(os.getpid(), socket.gethostname(), datetime.datetime.now().isoformat(timespec="seconds"))


def read_holder(lock: Path) -> Optional[Holder]:
    """The holder recorded in `lock`; None if the file is gone or unreadable (a lock being written)."""
    try:
        data = json.loads(lock.read_text())
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_stale(holder: Holder) -> bool:
    """A lock of a process of this host that no longer runs (or of an earlier process with our own pid)."""
    return holder.host == socket.gethostname() and (holder.pid == os.getpid() or not alive(holder.pid))


def _create(lock: Path, me: Holder) -> bool:
    """Create `lock` holding `me`, atomically; False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me._asdict(), f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_if_stale(lock: Path, stale: Holder) -> bool:
    """Remove `lock` if it still records `stale`. Takers serialise on a flock of the folder, so that two runs
    finding the same stale lock never remove the lock one of them has just created."""
    fd = os.open(lock.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if read_holder(lock) != stale:
            return False
        lock.unlink()
        return True
    finally:
        os.close(fd)


def acquire(folder: Path, flag: str = "--out") -> Path:
    """Take `folder/run.lock` for this process; `RunLocked` (one line naming the holder) if another live run
    holds it. A stale lock of this host is taken over with a warning on stderr."""
    lock, me = Path(folder) / NAME, this_run()
    for _ in range(40):
        if _create(lock, me):
            return lock
        holder = read_holder(lock)
        if holder is None:  # being written by the run that created it (or gone): look again shortly
            time.sleep(0.05)
            continue
        if not is_stale(holder):
            where = "wait for it to end or use another --out" if holder.host == me.host else \
                f"if that run is no longer running, delete {lock}"
            raise RunLocked(flag, f"{flag} {str(folder)!r} is in use by another run ({holder.describe()}); {where}")
        if _remove_if_stale(lock, holder):
            print(f"warning: {flag} {str(folder)!r}: taking over the lock of a run that is no longer running "
                  f"({holder.describe()})", file=sys.stderr)
    raise RunLocked(flag, f"{flag} {str(folder)!r} has an unreadable {NAME}; if no run is using the folder, "
                          f"delete {lock}")


def release(lock: Path) -> None:
    """Remove `lock` if this process holds it."""
    holder = read_holder(lock)
    if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def held(folder: Path, flag: str = "--out") -> Iterator[None]:
    """Hold `folder`'s run lock while the block runs."""
    lock = acquire(folder, flag)
    try:
        yield
    finally:
        release(lock)
