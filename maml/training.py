"""The generic meta-training loop: run a jitted chunk of steps, report metrics, checkpoint, resume.

Reliability: checkpoints are atomic and verified (`maml.checkpoint`); SIGTERM and Ctrl-C finish the
running chunk, write a checkpoint and raise `Interrupted`; a chunk with a non-finite meta-loss or one
that leaves non-finite parameters raises `Diverged` naming the step and quantity, and is never
checkpointed. To skip non-finite steps instead, wrap the outer optimiser in `optax.apply_if_finite` and
pass `skip_nonfinite=True`; `skipped_steps(state.opt_state)` counts the skipped steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from .meta import MetaTrainState, SampledStep, TaskSampler, scan_steps


class Interrupted(Exception):
    """Training stopped by a signal after checkpointing; run the same command again to resume."""

    def __init__(self, signum: int, step: int, checkpointed: bool):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        saved = "checkpoint written" if checkpointed else "no checkpoint folder"
        super().__init__(f"interrupted by {name} at step {step} ({saved}); run the same command to resume")


class Diverged(FloatingPointError):
    """A non-finite meta-loss, or a non-finite meta-gradient that made the parameters non-finite."""


def skipped_steps(opt_state) -> int:
    """Steps skipped so far by `optax.apply_if_finite` somewhere in `opt_state` (0 if it holds none).
    A state replicated over devices: pass `maml.parallel.to_local(opt_state)`."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
             if isinstance(s, optax.ApplyIfFiniteState)]
    return sum(int(s.total_notfinite) for s in found)


def _chunk_end(step: int, num_steps: int, steps_per_call: int, *periods: Optional[int]) -> int:
    """Next stopping point: a multiple of steps_per_call or of one of `periods`, or the end."""
    end = min(num_steps, (step // steps_per_call + 1) * steps_per_call)
    for period in periods:
        if period:
            end = min(end, (step // period + 1) * period)
    return end


@contextlib.contextmanager
def _deferred_signals() -> Iterator[dict]:
    """Record SIGTERM / SIGINT instead of dying mid-chunk; a second Ctrl-C interrupts at once."""
    caught: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and caught.get("signum") == signal.SIGINT:
            raise KeyboardInterrupt
        caught["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@eqx.filter_jit
def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])) if leaves else jnp.array(True)


def _check_finite(state: MetaTrainState, metrics: dict, start: int, end: int, last_good: Optional[int],
                  skip: bool = False) -> None:
    """Raise `Diverged` if the chunk `start..end` had a non-finite meta-loss (unless `skip`: the optimiser
    skipped those steps) or left non-finite parameters (checked on device)."""
    losses = np.asarray(metrics.get("meta_loss", np.zeros(0))).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(losses))
    params_ok = bool(_all_finite(state.model))
    if params_ok and (skip or not bad.size):
        return
    kept = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint kept"
    if skip:
        raise Diverged(f"meta-training diverged: the parameters turned non-finite between steps {start + 1} and "
                       f"{end} (more non-finite steps in a row than the optimiser may skip); stopped, {kept}")
    if bad.size:
        at = start + int(bad[0]) + 1
        raise Diverged(f"meta-training diverged: the meta-loss is {losses[bad[0]]} at step {at}; stopped, {kept}")
    raise Diverged(f"meta-training diverged: a non-finite meta-gradient between steps {start + 1} and {end} "
                   f"made the parameters non-finite; stopped, {kept}")


def fit(
    state: MetaTrainState,
    step: SampledStep,
    sampler: TaskSampler,
    *,
    num_steps: int,
    steps_per_call: int = 1,
    checkpoint_dir: Optional[Path] = None,
    checkpoint_every: Optional[int] = None,
    on_chunk: Optional[Callable[[int, dict], None]] = None,
    diagnose: Optional[Callable[[MetaTrainState], dict]] = None,
    diagnose_every: Optional[int] = None,
    progress: bool = True,
    desc: str = "meta-train",
    skip_nonfinite: bool = False,
) -> MetaTrainState:
    """Apply `step(state, sampler) -> (state, metrics)` until `state.step == num_steps`.

    `step` draws its tasks on device with `sampler` from `state.key` (see `maml.with_task_sampler`).
    Steps run `steps_per_call` at a time in one jitted `lax.scan`. With `checkpoint_dir`, training resumes
    from the newest checkpoint there, and checkpoints are written atomically every `checkpoint_every`
    steps, at the end, and when SIGTERM / Ctrl-C arrives (then `Interrupted` is raised). Chunk boundaries
    depend only on the step number, so a resumed run performs exactly the same computations as an
    uninterrupted one. `on_chunk(step, metrics)` gets each chunk's metrics as NumPy arrays with a leading
    step axis. A non-finite meta-loss or non-finite parameters after a chunk raise `Diverged` (nothing is
    checkpointed); with `skip_nonfinite` (the optimiser is wrapped in `optax.apply_if_finite`, which
    skips such steps) only non-finite parameters do.
    `diagnose(state) -> dict` (e.g. curvature diagnostics) runs every `diagnose_every` steps; its values
    join that chunk's metrics. It only reads the state, so training is the same with or without it.
    """
    for name, value in (("num_steps", num_steps), ("steps_per_call", steps_per_call)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"fit: {name}={value!r}; expected a positive integer")
    for name, value in (("checkpoint_every", checkpoint_every), ("diagnose_every", diagnose_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fit: {name}={value!r}; expected a positive integer or None")
    last_good = None
    if checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir, state)
        if found is not None:
            last_good, state = found
    chunks: dict[int, Callable] = {}
    current = int(state.step)
    bar = tqdm(total=num_steps, initial=current, desc=desc, disable=not progress, dynamic_ncols=True)
    running = None

    def checkpoint(s: MetaTrainState) -> Optional[int]:
        at = int(s.step)
        if checkpoint_dir is not None and at != last_good:
            save_checkpoint(checkpoint_dir, at, s)
            return at
        return last_good

    with _deferred_signals() as caught, contextlib.closing(bar):
        while current < num_steps:
            end = _chunk_end(current, num_steps, steps_per_call, checkpoint_every, diagnose and diagnose_every)
            n = end - current
            if n not in chunks:
                chunks[n] = eqx.filter_jit(scan_steps(step, n))
            new_state, metrics = chunks[n](state, sampler)
            metrics = jax.tree.map(np.asarray, metrics)
            _check_finite(new_state, metrics, current, end, last_good, skip_nonfinite)
            state, current = new_state, end
            if "meta_loss" in metrics:
                loss = float(np.mean(metrics["meta_loss"]))
                running = loss if running is None else 0.9 * running + 0.1 * loss
                bar.set_postfix(loss=f"{running:.4f}")
            bar.update(n)
            if end == num_steps or (checkpoint_every and end % checkpoint_every == 0):
                last_good = checkpoint(state)
            if diagnose is not None and diagnose_every and end % diagnose_every == 0:
                metrics.update(jax.tree.map(np.asarray, diagnose(state)))
            if on_chunk is not None:
                on_chunk(end, metrics)
            if caught.get("signum") is not None and current < num_steps:
                last_good = checkpoint(state)
                raise Interrupted(caught["signum"], current, checkpoint_dir is not None)
    return state


__all__ = ["Diverged", "Interrupted", "fit", "list_checkpoints", "skipped_steps"]
