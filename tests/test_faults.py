"""Fault injection on the real main job: SIGKILL / SIGTERM / Ctrl-C at random (seeded) moments, then the
same command again; the run must end with the identical params_sha256 and metrics as an uninterrupted one.
A checkpoint truncated on disk falls back to the previous one; a NaN injected into the meta-training data
stops the run naming the step (keeping the last good checkpoint, from which it resumes exactly), or with
--skip-nonfinite is skipped and counted.

Second round: a second run on the same --out stops at once naming the first, and a SIGKILLed run's lock
is taken over; a full disk while a checkpoint is written stops the run in one line and the same command
resumes exactly; a run folder of an older version (a config.json without a newer field) resumes with a
note; the tfds cache built by two experiments at once is built once, and a truncated one is rebuilt; a
worker SIGKILLed in a two-process `launch.multihost` run stops the other, named, and the same command
resumes exactly."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

ARGS = ["--iterations", "400", "--steps-per-call", "20", "--checkpoint-every", "20", "--hidden", "16,16",
        "--baseline-iterations", "20", "--eval-tasks", "20", "--eval-points", "10", "--eval-steps", "0,1",
        "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")  # compiled once, reused by every restart
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "WANDB_MODE": "disabled"}


# The main job with NaN tasks injected at meta-iteration AT (or at every iteration from AT: "every").
POISONED = """
import sys
import jax, jax.numpy as jnp
from experiments import cli, runtime, sinusoid
at, every = int(sys.argv[1]), sys.argv[2] == "every"
real = runtime.train_step

def poisoned(*args, **kwargs):
    step = real(*args, **kwargs)
    def run(state, sampler):
        bad = state.step >= at - 1 if every else state.step == at - 1
        return step(state, lambda key: jax.tree.map(lambda a: jnp.where(bad, jnp.nan, a), sampler(key)))
    return run

runtime.train_step = poisoned
cli.run(sinusoid.main, sys.argv[3:])
"""


# The main job whose checkpoint writer fails like a full disk at step AT, after writing half the file (where
# a disk fills up: a partial file at the destination, then ENOSPC).
FULL_DISK = """
import errno, os, sys
import maml
from experiments import cli, sinusoid
at = int(sys.argv[1])
real = maml.Checkpointer

def full_disk(path, data):
    if path.name == f"ckpt_{at:09d}.eqx":
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    maml.atomic_write_bytes(path, data)

maml.Checkpointer = lambda *args, **kwargs: real(*args, **kwargs, write=full_disk)
cli.run(sinusoid.main, sys.argv[2:])
"""


def start(out, env, *extra):
    return subprocess.Popen([sys.executable, "-m", "experiments.sinusoid", *ARGS, *extra, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_poisoned(out, env, at, mode, *extra):
    proc = subprocess.run([sys.executable, "-c", POISONED, str(at), mode, *ARGS, *extra, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr


def checkpoints(out):
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.glob("ckpt_*.json")) if folder.exists() else []


def run_to_end(out, env):
    proc = start(out, env)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return json.loads((out / "results.json").read_text())


def newest_step(out):
    names = checkpoints(out)
    return int(names[-1][5:14]) if names else 0


def interrupt(out, env, sig, rng):
    """Start the run, wait for a random number of new checkpoints plus a random delay, send `sig`."""
    before = newest_step(out)  # (the folder keeps only the newest 3: count steps, not files)
    proc = start(out, env)
    target, deadline = before + 20 * rng.randint(1, 3), time.time() + 300
    while newest_step(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    return run_to_end(tmp_path_factory.mktemp("straight") / "run", env)


def same_results(a, b):
    assert a["params_sha256"] == b["params_sha256"]
    assert a["mse"] == b["mse"] and a["baseline_mse"] == b["baseline_mse"]


def test_sigkill_at_five_random_points_resumes_exactly(tmp_path, env, reference):
    rng = random.Random(1234)
    out = tmp_path / "run"
    for _ in range(5):
        code, _ = interrupt(out, env, signal.SIGKILL, rng)
        assert code in (-signal.SIGKILL, 0)
    same_results(run_to_end(out, env), reference)


def test_a_second_run_on_the_same_out_stops_at_once_naming_the_first(tmp_path, env, reference):
    out = tmp_path / "run"
    first = start(out, env)
    deadline = time.time() + 300
    while not checkpoints(out) and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    saved = (out / "config.json").read_bytes(), (out / "config.json").stat().st_mtime_ns
    # --iterations may differ on resume: without the lock this one would rewrite config.json and train too
    second = subprocess.run([sys.executable, "-m", "experiments.sinusoid", *ARGS, "--iterations", "600", "--out",
                             str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second started; nothing was tested"
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --out '{out}' is in use by another run (pid {first.pid} on host "
                           f"{socket.gethostname()}, started "), last
    assert last.endswith("); wait for it to end or use another --out"), last
    assert ((out / "config.json").read_bytes(), (out / "config.json").stat().st_mtime_ns) == saved
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    same_results(json.loads((out / "results.json").read_text()), reference)
    assert not (out / "run.lock").exists()


def test_a_full_disk_while_checkpointing_stops_in_one_line_and_resumes_exactly(tmp_path, env, reference):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "60", *ARGS, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 74, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: could not write checkpoint {out / 'checkpoints' / 'ckpt_000000060.eqx'} (No space left on device); "
        "the newest complete checkpoint (step 40) is kept; free some space and run the same command to resume")
    assert sorted(os.listdir(out / "checkpoints")) == [f"ckpt_0000000{s}.{x}" for s in (20, 40) for x in ("eqx", "json")]
    assert not (out / "results.json").exists() and not (out / "run.lock").exists()
    same_results(run_to_end(out, env), reference)  # space freed: the same command resumes from step 40


def test_a_killed_run_of_an_older_version_resumes_taking_over_its_lock_with_a_note(tmp_path, env, reference):
    out = tmp_path / "run"
    rng = random.Random(3)
    while not checkpoints(out):
        interrupt(out, env, signal.SIGKILL, rng)
    killed = json.loads((out / "run.lock").read_text())  # a SIGKILLed run's lock stays behind
    saved = json.loads((out / "config.json").read_text())
    del saved["skip_nonfinite"]  # as written before --skip-nonfinite existed
    (out / "config.json").write_text(json.dumps(saved))
    proc = start(out, env)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    lines = stderr.splitlines()
    assert (f"warning: --out '{out}': taking over the lock of a run that is no longer running (pid {killed['pid']} "
            f"on host {socket.gethostname()}, started {killed['started']})") in lines
    assert (f"note: --out '{out}' holds a run of an older version without --skip-nonfinite; resuming with "
            "--skip-nonfinite 0, which is what it did") in lines
    assert not (out / "run.lock").exists()
    assert json.loads((out / "config.json").read_text())["skip_nonfinite"] == 0
    same_results(json.loads((out / "results.json").read_text()), reference)


def test_sigterm_checkpoints_before_exiting_and_resumes_exactly(tmp_path, env, reference):
    rng = random.Random(99)
    out = tmp_path / "run"
    for _ in range(2):
        code, stderr = interrupt(out, env, signal.SIGTERM, rng)
        if code == 0:  # finished before the signal landed
            break
        assert code == 128 + signal.SIGTERM, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("interrupted by SIGTERM at step ") and "checkpoint written" in line, stderr
        step = int(line.split("at step ")[1].split()[0])
        assert checkpoints(out)[-1] == f"ckpt_{step:09d}.json"
    same_results(run_to_end(out, env), reference)


def test_ctrl_c_checkpoints_before_exiting_and_resumes_exactly(tmp_path, env, reference):
    rng = random.Random(7)
    out = tmp_path / "run"
    code, stderr = interrupt(out, env, signal.SIGINT, rng)
    if code != 0:  # (0: finished before the signal landed)
        assert code == 128 + signal.SIGINT, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("interrupted by SIGINT at step ") and "checkpoint written" in line, stderr
    same_results(run_to_end(out, env), reference)


def test_nan_stops_naming_the_step_keeps_the_last_good_checkpoint_and_resumes(tmp_path, env):
    out = tmp_path / "run"
    code, stderr = run_poisoned(out, env, 37, "once")
    assert code == 3, stderr
    assert stderr.strip().splitlines()[-1] == ("error: meta-training diverged: the meta-loss is nan at step 37; "
                                               "stopped, the last good checkpoint (step 20) is kept")
    assert checkpoints(out)[-1] == "ckpt_000000020.json" and not (out / "results.json").exists()
    # The fault cleared (a poison that never fires: the same compiled program, which XLA may fuse, and so
    # round, differently from the plain job's), the same command resumes from step 20 and ends exactly as
    # an uninterrupted run of that program.
    never = 10 ** 6
    assert run_poisoned(out, env, never, "once")[0] == 0
    assert run_poisoned(tmp_path / "straight", env, never, "once")[0] == 0
    same_results(*(json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "straight")))


def test_nan_is_skipped_and_counted_with_skip_nonfinite(tmp_path, env):
    code, stderr = run_poisoned(tmp_path / "once", env, 37, "once", "--skip-nonfinite", "3")
    assert code == 0, stderr
    results = json.loads((tmp_path / "once" / "results.json").read_text())
    assert results["skipped_steps"] == 1 and results["meta_iterations"] == 400
    assert all(v == v for v in results["mse"].values())  # finite: the NaN step changed nothing
    # NaN at every step from 37 on: 3 skips in a row, then the update goes through and the run stops
    code, stderr = run_poisoned(tmp_path / "every", env, 37, "every", "--skip-nonfinite", "3")
    assert code == 3, stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: meta-training diverged: the parameters turned non-finite between steps 21 and 40 (more non-finite "
        "steps in a row than the optimiser may skip); stopped, the last good checkpoint (step 20) is kept")


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, env, reference):
    out = tmp_path / "run"
    rng = random.Random(5)
    while len(checkpoints(out)) < 2:
        interrupt(out, env, signal.SIGKILL, rng)
    names = checkpoints(out)
    newest = out / "checkpoints" / names[-1].replace(".json", ".eqx")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = start(out, env)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"checkpoint {newest} is corrupt" in stderr and "falling back to the previous checkpoint" in stderr
    same_results(json.loads((out / "results.json").read_text()), reference)


def omniglot(data, cache, out, env):
    """experiments.omniglot up to its data: 300 ways is more classes than the meta-test alphabets have, an
    error that comes only once the splits are read (no training: no compilation)."""
    return subprocess.Popen([sys.executable, "-m", "experiments.omniglot", "--data-dir", str(data), "--cache-dir",
                             str(cache), "--ways", "300", "--wandb", "disabled", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


READ_300_WAYS = ("error: meta-test alphabets: episodes: ways=300 is more than the split's 228 classes "
                 "(57 characters x 4 rotations)")


def test_two_experiments_build_a_fresh_tfds_cache_once_and_a_truncated_one_is_rebuilt(tmp_path, env, shared_data):
    data, cache = shared_data / "omniglot", tmp_path / "cache"
    procs = [omniglot(data, cache, tmp_path / f"out{i}", env) for i in range(2)]  # at once, on a fresh cache
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 2 and err.strip().splitlines()[-1] == READ_300_WAYS, err  # both read the splits
    assert sum("omniglot: building the tfds cache" in err for err in errors) == 1, errors
    shard = next(cache.glob("maml_omniglot/*/1.0.0/maml_omniglot-small2.array_record-*"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    leftover = shard.parent.parent / "incomplete.KILLED_1.0.0"  # what a build killed midway leaves
    leftover.mkdir()
    (leftover / shard.name).write_bytes(b"half")
    proc = omniglot(data, cache, tmp_path / "out2", env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == READ_300_WAYS, err
    assert f"warning: omniglot: the tfds cache {shard.parent} is corrupt (" in err, err
    assert shard.stat().st_size == size and not leftover.exists()


MULTIHOST = ["-m", "launch.multihost", "--num-processes", "2", "--grace", "5", "--", sys.executable, "-m",
             "experiments.sinusoid", "--iterations", "60", "--steps-per-call", "20", "--checkpoint-every", "20",
             "--hidden", "16,16", "--meta-batch", "24", "--baseline-iterations", "20", "--eval-tasks", "20",
             "--eval-points", "10", "--eval-steps", "0,1", "--no-progress"]


def launch(out, env, log):
    with open(log, "w") as stdout:
        return subprocess.Popen([sys.executable, *MULTIHOST, "--out", str(out)], env=env, stdout=stdout,
                                stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_worker_killed_in_a_two_process_run_stops_the_other_named_and_resumes_exactly(tmp_path, env):
    straight = launch(tmp_path / "straight", env, tmp_path / "straight.log")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err + (tmp_path / "straight.log").read_text()[-3000:]
    reference = json.loads((tmp_path / "straight" / "results.json").read_text())

    out = tmp_path / "run"
    proc = launch(out, env, tmp_path / "killed.log")
    pids = [int(proc.stderr.readline().split("pid ")[1]) for _ in range(2)]  # "[launch] process i: pid P"
    deadline = time.time() + 300
    while newest_step(out) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the kill; nothing was tested"
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 30, "the surviving process should be stopped within --grace seconds"
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert (f"[launch] process 1 of 2 (pid {pids[1]}) was killed by SIGKILL; stopping the others (at most 5 s)"
            in err.splitlines()), err
    assert 20 <= newest_step(out) < 60 and not (out / "results.json").exists()

    again = launch(out, env, tmp_path / "resumed.log")  # the same command
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err + (tmp_path / "resumed.log").read_text()[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["params_sha256"] == reference["params_sha256"] and resumed["mse"] == reference["mse"]
