"""The run folder's lock (experiments/runlock.py) against races: a stale lock is removed only while it still
names the dead run (so that two runs finding it at once never remove the lock one of them has just taken),
and a run only ever removes its own lock. (The entry point's cases, a second run and a killed run's lock,
are in tests/test_faults.py; the one-line errors in README's bad-input table.)"""

import json
import os
import socket
import subprocess
import sys

from experiments import runlock


def write_lock(folder, pid: int) -> runlock.Holder:
    holder = runlock.Holder(pid, socket.gethostname(), "2026-01-01T00:00:00")
    (folder / runlock.NAME).write_text(json.dumps(holder._asdict()))
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_removed_only_while_it_still_names_the_dead_run(tmp_path):
    stale = write_lock(tmp_path, dead_pid())
    assert runlock.is_stale(stale) and not runlock.is_stale(stale._replace(pid=os.getppid()))  # (alive)
    # Another run found it stale too, removed it and took the folder before this one got to it:
    write_lock(tmp_path, os.getppid())
    assert not runlock._remove_if_stale(tmp_path / runlock.NAME, stale)
    assert runlock.read_holder(tmp_path / runlock.NAME).pid == os.getppid()
    write_lock(tmp_path, stale.pid)
    assert runlock._remove_if_stale(tmp_path / runlock.NAME, stale) and not (tmp_path / runlock.NAME).exists()


def test_a_run_removes_only_its_own_lock(tmp_path):
    lock = runlock.acquire(tmp_path)
    holder = runlock.read_holder(lock)
    assert holder.pid == os.getpid() and holder.host == socket.gethostname()
    lock.write_text(json.dumps({**holder._asdict(), "pid": holder.pid + 1}))  # taken over meanwhile
    runlock.release(lock)
    assert lock.exists()
