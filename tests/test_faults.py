"""Fault injection on the real main job: SIGKILL / SIGTERM / Ctrl-C at random (seeded) moments, then the
same command again; the run must end with the identical params_sha256 and metrics as an uninterrupted one.
A checkpoint truncated on disk falls back to the previous one; a NaN injected into the meta-training data
stops the run naming the step (keeping the last good checkpoint, from which it resumes exactly), or with
--skip-nonfinite is skipped and counted."""

import json
import os
import random
import signal
import subprocess
import sys
import time

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


def interrupt(out, env, sig, rng):
    """Start the run, wait for a random number of new checkpoints plus a random delay, send `sig`."""
    before = len(checkpoints(out))
    proc = start(out, env)
    target, deadline = before + rng.randint(1, 3), time.time() + 300
    while len(checkpoints(out)) < target and proc.poll() is None and time.time() < deadline:
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
