"""Where an experiment runs: devices, and processes joined through `jax.distributed` (multi-host).

`RuntimeConfig` is a section of every experiment's config (`runtime: RuntimeConfig`), giving the flags

    --devices N              devices per process (default: all local devices)
    --coordinator HOST:PORT  process 0's address, for multi-host runs
    --num-processes N        processes in the run (default: SLURM_NTASKS inside `srun`, else 1)
    --process-id I           this process (default: SLURM_PROCID inside `srun`, else 0)
    --coordinator-timeout S  how long to wait for every process to reach the coordinator

`initialize(config)` joins the processes (once, before any other JAX work), with gloo collectives on
CPU; inside a SLURM step (`srun`) the unset fields come from SLURM. `train_step(config, ...)` is the
single-device step on one device and `maml.parallel.train_step` over `devices x processes`
devices otherwise. Every process runs the same program; only `is_writer()` (process 0) writes files.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import equinox as eqx
import jax

import maml
from experiments.config import flag
from maml.meta import MetaTrainState, SampledStep

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _f(default, help):  # none of these changes what is computed (beyond float round-off): resumable
    return flag(default, help, resumable=True)


@dataclass(frozen=True)
class RuntimeConfig:
    """Devices and processes of the run."""

    devices: Optional[int] = _f(None, "devices per process (default: all local devices)")
    coordinator: Optional[str] = _f(None, "HOST:PORT of process 0 for a multi-process run (default: from SLURM)")
    num_processes: Optional[int] = _f(None, "processes in the run (default: SLURM_NTASKS under srun, else 1)")
    process_id: Optional[int] = _f(None, "index of this process (default: SLURM_PROCID under srun, else 0)")
    coordinator_timeout: int = _f(120, "seconds to wait for all processes to reach the coordinator")

    def __post_init__(self):
        for name in ("devices", "num_processes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value}; expected a positive integer")
        if self.coordinator_timeout < 1:
            raise ValueError(f"--coordinator-timeout={self.coordinator_timeout}; expected seconds >= 1")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            raise ValueError(f"--process-id={self.process_id}; expected 0 <= id < --num-processes={self.num_processes or 1}")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--coordinator={self.coordinator!r}; expected HOST:PORT")
        if (self.num_processes or 1) > 1 and self.coordinator is None and not in_slurm_step():
            raise ValueError(f"--num-processes={self.num_processes} needs --coordinator HOST:PORT (or a SLURM srun step)")


def in_slurm_step() -> bool:
    """Inside a SLURM job step (`srun`), where SLURM says how many processes there are and which we are."""
    return all(v in os.environ for v in SLURM_VARS)


def initialize(config: RuntimeConfig) -> None:
    """Join the run's processes through `jax.distributed` (a no-op for a single process or when done).

    Waits at most `config.coordinator_timeout` seconds for all processes to reach the coordinator, then
    raises a one-line ValueError. Must run before any other JAX computation in the process. Checks
    `--devices` against this process's devices, so a bad value fails before anything is written.
    """
    _join(config)
    num_devices(config)


def _join(config: RuntimeConfig) -> None:
    slurm = in_slurm_step() and config.coordinator is None
    num = config.num_processes or (int(os.environ["SLURM_NTASKS"]) if slurm else 1)
    if num == 1 or jax.distributed.is_initialized():
        return
    pid = config.process_id if config.process_id is not None else (int(os.environ["SLURM_PROCID"]) if slurm else 0)
    # gloo: cross-process collectives on CPU (the default in recent JAX, unset before jax 0.5).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where, timeout = config.coordinator or "the SLURM job's first node", config.coordinator_timeout
    problem = (f"--coordinator={where}: process {pid} of {num} could not join the run within "
               f"--coordinator-timeout={timeout} s")
    start = time.monotonic()
    # jax's client aborts the whole process (a C++ fatal error, no exception) when the coordinator does
    # not answer in time; so first wait here, boundedly, until something listens at the address.
    if pid != 0 and config.coordinator is not None and not _wait_for_listener(config.coordinator, timeout):
        raise ValueError(f"{problem}: nothing listens there; start process 0 first, or check HOST:PORT")
    remaining = max(10, int(timeout - (time.monotonic() - start)))
    print(f"runtime: process {pid} of {num} joining {where} (waiting up to {remaining} s for all)",
          file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(config.coordinator, num, pid, initialization_timeout=remaining)
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...): one line for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{problem} ({reason}); check that every process was started") from None


def _wait_for_listener(address: str, timeout: float) -> bool:
    """Whether a TCP connection to HOST:PORT succeeds within `timeout` seconds (retrying)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


def is_writer() -> bool:
    """Whether this process writes checkpoints, results and logs: process 0 only."""
    return jax.process_index() == 0


def num_devices(config: RuntimeConfig) -> int:
    """Devices the run trains on: `--devices` (default all local) on each of the processes."""
    local = jax.local_device_count()
    per_process = config.devices or local
    if per_process > local:
        platform = jax.local_devices()[0].platform
        raise ValueError(f"--devices={per_process}, but this process has only {local} {platform} device(s)")
    return per_process * jax.process_count()


def train_step(
    config: RuntimeConfig,
    algo: Any,
    *,
    batching: maml.AbstractBatching = maml.Vmap(),
    meta_batch: int,
) -> SampledStep:
    """The sampling step `(state, sampler) -> (state, metrics)` for this run's devices.

    `algo` is an `experiments.algorithms.Algorithm` (optimiser, inner loop, strategy). One device:
    `maml.with_task_sampler(maml.make_train_step(...))`, unchanged. Several: the sharded
    data-parallel step, each device mapping its own tasks with `batching` (the sampler must follow
    `maml.parallel`'s protocol); ValueError naming `--meta-batch` when the batch does not divide among them.
    """
    n = num_devices(config)
    optimizer, inner, strategy = algo.optimizer, algo.inner, algo.strategy
    if n == 1:
        return maml.with_task_sampler(maml.make_train_step(optimizer, inner, strategy=strategy, batching=batching))
    if meta_batch % n:
        raise ValueError(
            f"--meta-batch={meta_batch} does not divide evenly across {n} devices "
            f"({n // jax.process_count()} per process x {jax.process_count()} processes); "
            "change --meta-batch or --devices"
        )
    return maml.parallel.train_step(optimizer, inner, strategy=strategy, batching=batching, num_devices=n)


def resume(state: MetaTrainState, checkpoint_dir: Optional[Path]) -> tuple[MetaTrainState, Optional[Path]]:
    """`(state, checkpoint_dir)` to hand to `maml.fit` on this process; every process calls it with the same
    `checkpoint_dir` (the run's, or None for training that is not checkpointed).

    Single process: unchanged (fit resumes and writes). Several: process 0 keeps the folder (it resumes
    from it and writes); the others get process 0's resumed state broadcast (no shared filesystem
    needed) and no folder, so they never write.
    """
    if jax.process_count() == 1 or checkpoint_dir is None:  # the same decision on every process: all of
        return state, checkpoint_dir                          # them take part in the broadcast, or none
    from jax.experimental import multihost_utils

    if is_writer():
        found = maml.latest_checkpoint(checkpoint_dir, state)
        state = found[1] if found is not None else state
    arrays, static = eqx.partition(state, eqx.is_array)
    arrays = multihost_utils.broadcast_one_to_all(arrays)
    return eqx.combine(arrays, static), checkpoint_dir if is_writer() else None
