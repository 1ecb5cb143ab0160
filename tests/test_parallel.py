"""Data parallelism (`maml.parallel`) against the single-device step, on fake CPU devices in subprocesses.

- one process with 4 fake devices: after `STEPS` meta-steps (second-order MAML, Adam), the parameters from
  `pmap` on 1, 2, 4 devices and from the sharded step on 4 devices equal the single-device step's to
  float32 round-off: `|a - b| <= ATOL + RTOL * |b|` elementwise (observed: bit-identical at the XLA
  optimisation level 0 used here; up to 6e-8 on params of size ~1 with default optimisation);
- 2 processes x 2 fake devices joined by `jax.distributed` (through `launch.multihost`): the sharded step's
  parameters equal the 4-device single-process run's to the same tolerance, and are bit-identical in both
  processes;
- bad input: more devices than exist, a batch that does not divide, a coordinator that never answers.

The subprocesses run this file as a script (`python tests/test_parallel.py MODE OUT [flags]`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, SHOTS, HIDDEN = 3, 8, 4, (8,)
RTOL, ATOL = 1e-5, 1e-6  # float32 round-off: the mean over tasks is summed in another order


def _problem():
    import jax
    import optax

    import maml

    optimizer = optax.adam(1e-2)
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    model = maml.nn.MLP(1, 1, HIDDEN, key=jax.random.PRNGKey(0))
    return optimizer, inner, maml.init_state(model, optimizer, jax.random.PRNGKey(1))


def _fit(step, state, sampler) -> dict[str, np.ndarray]:
    """Flattened parameters (and the step count) after `STEPS` steps of `maml.fit`, as NumPy arrays."""
    import equinox as eqx
    import jax

    import maml

    out = maml.parallel.to_local(maml.fit(state, step, sampler, num_steps=STEPS, steps_per_call=STEPS, progress=False).state)
    leaves = jax.tree.leaves(eqx.filter(out.model, eqx.is_array))
    return {f"p{i}": np.asarray(a) for i, a in enumerate(leaves)} | {"step": np.asarray(out.step)}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def worker_devices(out: Path) -> None:
    """One process, 4 fake devices: single-device, pmap on 1/2/4 and sharded on 2/4 devices; errors."""
    import maml
    from data.sinusoid import SinusoidTasks

    optimizer, inner, state = _problem()
    sampler = SinusoidTasks(BATCH, SHOTS, SHOTS)
    runs = {"single": maml.with_task_sampler(maml.make_train_step(optimizer, inner))}
    for n in (1, 2, 4):
        runs[f"pmap{n}"] = maml.parallel.train_step(optimizer, inner, num_devices=n, over=maml.parallel.Pmap())
    runs["sharded4"] = maml.parallel.train_step(optimizer, inner, num_devices=4)
    for name, step in runs.items():
        start = time.perf_counter()
        np.savez(out / f"{name}.npz", **_fit(step, state, sampler))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    odd = SinusoidTasks(6, SHOTS, SHOTS)
    errors = {
        "pmap_batch": _error(lambda: _fit(runs["pmap4"], state, odd)),
        "sharded_batch": _error(lambda: _fit(runs["sharded4"], state, odd)),
        "too_many": _error(lambda: maml.parallel.train_step(optimizer, inner, num_devices=5)),
        "pmap_too_many": _error(lambda: maml.parallel.train_step(optimizer, inner, num_devices=8, over=maml.parallel.Pmap())),
    }
    (out / "errors.json").write_text(json.dumps(errors))


def worker_distributed(out: Path, argv: list[str]) -> None:
    """One of the processes of a `jax.distributed` run (flags from `launch.multihost`): sharded step."""
    from experiments import cli, runtime

    config = cli.parse(runtime.RuntimeConfig, argv)
    runtime.initialize(config)
    import jax

    import maml
    from data.sinusoid import SinusoidTasks

    optimizer, inner, state = _problem()
    step = maml.parallel.train_step(optimizer, inner)  # all devices of all processes
    result = _fit(step, state, SinusoidTasks(BATCH, SHOTS, SHOTS))
    np.savez(out / f"process{jax.process_index()}.npz", **result)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, done", flush=True)


def _run(args: list[str], *, devices: int, timeout: float) -> subprocess.CompletedProcess:
    # Optimisation level 0 halves the compile time; the reference is compiled with the same flags.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def _assert_close(a: dict, b: dict, what: str) -> float:
    assert a.keys() == b.keys(), what
    assert int(a["step"]) == int(b["step"]) == STEPS, what
    worst = 0.0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"{what}: {k}")
        worst = max(worst, float(np.max(np.abs(a[k] - b[k]))))
    return worst


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("devices")
    proc = _run([__file__, "devices", str(out)], devices=4, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("name", ["pmap1", "pmap2", "pmap4", "sharded4"])
def test_parallel_matches_single_device(four_devices, name):
    single = _load(four_devices / "single.npz")
    _assert_close(_load(four_devices / f"{name}.npz"), single, f"{name} vs single device")
    # The parameters moved: the comparison is not trivially between initial values.
    assert any(np.max(np.abs(v)) > 0 for k, v in single.items() if k != "step")


def test_bad_input_messages(four_devices):
    errors = json.loads((four_devices / "errors.json").read_text())
    for key in ("pmap_batch", "sharded_batch"):
        assert "meta-batch of 6 tasks does not divide evenly across 4 devices" in errors[key], errors[key]
    assert errors["too_many"].startswith("num_devices=5, but only 4 cpu device(s) exist"), errors["too_many"]
    assert errors["pmap_too_many"].startswith("num_devices=8, but only 4"), errors["pmap_too_many"]
    assert all("\n" not in message for message in errors.values())


def test_two_processes_match_four_devices(four_devices, tmp_path):
    cmd = ["-m", "launch.multihost", "--num-processes", "2", "--cpu-devices", "2", "--",
           sys.executable, __file__, "distributed", str(tmp_path)]
    proc = _run(cmd, devices=2, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] process 0 of 2: 4 devices, done" in proc.stdout and "[1] process 1 of 2: 4 devices, done" in proc.stdout
    p0, p1 = _load(tmp_path / "process0.npz"), _load(tmp_path / "process1.npz")
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"process 0 vs 1: {k}")
    _assert_close(p0, _load(four_devices / "sharded4.npz"), "2 processes x 2 devices vs 1 process x 4 devices")
    _assert_close(p0, _load(four_devices / "single.npz"), "2 processes x 2 devices vs single device")


def test_launcher_fails_when_a_process_fails():
    code = "import sys; sys.exit(3 if '--process-id' in sys.argv and sys.argv[-1] == '1' else 0)"
    proc = _run(["-m", "launch.multihost", "--num-processes", "2", "--", sys.executable, "-c", code], devices=1, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr


def test_more_devices_than_exist():
    import jax

    import maml

    with pytest.raises(ValueError, match=rf"num_devices={jax.device_count() + 1}, but only {jax.device_count()} "):
        maml.parallel.select_devices(jax.device_count() + 1)
    with pytest.raises(ValueError, match=r"num_devices=0; expected a positive integer"):
        maml.parallel.select_devices(0)


def test_sinusoid_sample_range_is_a_slice_of_the_batch():
    import jax
    import jax.numpy as jnp

    from data.sinusoid import SinusoidTasks

    sampler, key = SinusoidTasks(8, SHOTS, 3), jax.random.PRNGKey(3)
    full, part = jax.jit(sampler)(key), jax.jit(sampler.sample_range, static_argnums=2)(key, jnp.int32(4), 4)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part)):  # the same tasks (to float32 rounding:
        np.testing.assert_allclose(np.asarray(a)[4:8], np.asarray(b), rtol=1e-6, atol=1e-6)  # XLA fuses sin)
    assert not np.allclose(np.asarray(full.support_x)[:4], np.asarray(part.support_x), atol=1e-3)


def test_replicate_and_to_local():
    import jax.numpy as jnp

    import maml

    tree = {"a": jnp.arange(3.0), "name": "static"}
    placed = maml.parallel.replicate(tree, maml.parallel.select_devices(1))
    assert placed["a"].sharding.is_fully_replicated and placed["name"] == "static"
    back = maml.parallel.to_local(placed)
    np.testing.assert_array_equal(np.asarray(back["a"]), np.arange(3.0))


def test_runtime_flags_are_checked():
    from experiments import runtime

    with pytest.raises(ValueError, match=r"--num-processes=2 needs --coordinator HOST:PORT"):
        runtime.RuntimeConfig(num_processes=2)
    with pytest.raises(ValueError, match=r"--coordinator='localhost'; expected HOST:PORT"):
        runtime.RuntimeConfig(coordinator="localhost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"--process-id=2; expected 0 <= id < --num-processes=2"):
        runtime.RuntimeConfig(coordinator="localhost:1234", num_processes=2, process_id=2)


def test_coordinator_that_never_answers():
    """Process 1 of 2 waits a bounded time for a coordinator nobody runs, then exits with one clear line."""
    from launch.multihost import free_port

    port = free_port()
    start = time.perf_counter()
    proc = _run(["-m", "experiments.sinusoid", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", "1", "--coordinator-timeout", "3", "--out", "/nonexistent/never-written",
                 "--wandb", "disabled"], devices=1, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --coordinator=127.0.0.1:{port}: process 1 of 2 could not join the run within "
                           "--coordinator-timeout=3 s"), last
    assert time.perf_counter() - start < 100


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "devices":
        worker_devices(out)
    elif mode == "distributed":
        worker_distributed(out, sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
