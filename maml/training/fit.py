"""The meta-training loop: jitted chunks of steps, periodic work as hooks, checkpoints, exact resume.

    result = maml.fit(state, step, sampler, num_steps=70_000, steps_per_call=1000,
                      checkpointer=maml.Checkpointer(out / "checkpoints", every=10_000),
                      hooks=[logger.hook(every=1000), maml.Hook(validate, every=5000)])
    result.state, result.stopped_by          # "num_steps", or the reason of a hook's `Stop`

Periodic work (logging, validation, curvature, a time budget...) is a `Hook(fn, every)`: `fn(info)` runs
whenever `info.step` is a multiple of `every` (chunks end there), and once more at the end; it may
return `Stop(reason)`, which ends training after that step. Hooks only read the state, so training is
the same with or without them.

Reliability: checkpoints are atomic and verified (`maml.Checkpointer`); SIGTERM and Ctrl-C finish the
running chunk, write a checkpoint and raise `Interrupted`; a chunk with a non-finite meta-loss, or one
that leaves non-finite parameters, raises `Diverged` naming the step and quantity, and is never
checkpointed. An optimiser wrapped in `optax.apply_if_finite` skips non-finite steps instead (fit reads
that from the optimiser state): then only non-finite parameters stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ..meta import MetaTrainState, SampledStep, TaskSampler, scan_steps
from .checkpoints import Checkpointer


class Interrupted(Exception):
    """Training stopped by a signal after checkpointing; run the same command again to resume."""

    def __init__(self, signum: int, step: int, checkpointed: bool):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        saved = "checkpoint written" if checkpointed else "no checkpoint folder"
        super().__init__(f"interrupted by {name} at step {step} ({saved}); run the same command to resume")


class Diverged(FloatingPointError):
    """A non-finite meta-loss, or a non-finite meta-gradient that made the parameters non-finite."""


class Stop(NamedTuple):
    """Returned by a hook to end training after the current step; `reason` becomes `FitResult.stopped_by`."""

    reason: str


class StepInfo(NamedTuple):
    """What a hook sees: the step reached, the state there, the metrics of every step since the hook last
    ran (NumPy arrays with a leading step axis), and whether this is the last call of this `fit`."""

    step: int
    state: MetaTrainState
    metrics: dict
    final: bool


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(info) -> Stop | None`, run at every multiple of `every` steps and (with `at_end`) once more at
    the end of training if the last step is not one."""

    fn: Callable[[StepInfo], Optional[Stop]]
    every: int
    at_end: bool = True

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"Hook: every={self.every!r}; expected a positive integer")


class FitResult(NamedTuple):
    """The final state and why training ended: "num_steps", or the reason of a hook's `Stop`."""

    state: MetaTrainState
    stopped_by: str


def skipped_steps(opt_state) -> int:
    """Steps skipped so far by `optax.apply_if_finite` somewhere in `opt_state` (0 if it holds none).
    A state replicated over devices: pass `maml.parallel.to_local(opt_state)`."""
    return sum(int(s.total_notfinite) for s in _finite_states(opt_state))


def _finite_states(opt_state) -> list:
    is_state = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]


def _chunk_end(step: int, num_steps: int, periods: Sequence[int]) -> int:
    """Next stopping point: the next multiple of one of `periods`, or the end."""
    return min([num_steps] + [(step // p + 1) * p for p in periods])


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
                  skip: bool) -> None:
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


class _Pending:
    """Per hook, the chunks' metrics since it last ran."""

    def __init__(self, n: int):
        self.chunks: list[list[dict]] = [[] for _ in range(n)]

    def add(self, metrics: dict) -> None:
        for chunks in self.chunks:
            chunks.append(metrics)

    def take(self, i: int) -> dict:
        chunks, self.chunks[i] = self.chunks[i], []
        return jax.tree.map(lambda *a: np.concatenate(a), *chunks) if chunks else {}


def fit(
    state: MetaTrainState,
    step: SampledStep,
    sampler: TaskSampler,
    *,
    num_steps: int,
    steps_per_call: int = 1,
    checkpointer: Optional[Checkpointer] = None,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
    desc: str = "meta-train",
) -> FitResult:
    """Apply `step(state, sampler) -> (state, metrics)` until `state.step == num_steps` or a hook stops.

    `step` draws its tasks on device with `sampler` from `state.key` (see `maml.with_task_sampler`).
    Steps run `steps_per_call` at a time in one jitted `lax.scan`; chunks also end at every hook's and the
    checkpointer's multiples. Chunk boundaries depend only on the step number, so a run resumed from
    `checkpointer`'s folder performs exactly the same computations as an uninterrupted one.
    """
    for name, value in (("num_steps", num_steps), ("steps_per_call", steps_per_call)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"fit: {name}={value!r}; expected a positive integer")
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise ValueError(f"fit: hooks holds a {type(hook).__name__}; expected maml.Hook values")
    last_good = None
    if checkpointer is not None:
        last_good, state = checkpointer.restore(state)
    skip = bool(_finite_states(state.opt_state))
    periods = [steps_per_call] + [h.every for h in hooks] + ([checkpointer.every] if checkpointer else [])
    chunks: dict[int, Callable] = {}
    pending = _Pending(len(hooks))
    current = int(state.step)
    bar = tqdm(total=num_steps, initial=current, desc=desc, disable=not progress, dynamic_ncols=True)
    running, stopped_by = None, "num_steps"

    def save(s: MetaTrainState) -> Optional[int]:
        at = int(s.step)
        if checkpointer is not None and at != last_good:
            checkpointer.save(at, s)
            return at
        return last_good

    with _deferred_signals() as caught, contextlib.closing(bar):
        while current < num_steps:
            end = _chunk_end(current, num_steps, periods)
            n = end - current
            if n not in chunks:
                chunks[n] = eqx.filter_jit(scan_steps(step, n))
            new_state, metrics = chunks[n](state, sampler)
            metrics = jax.tree.map(np.asarray, metrics)
            _check_finite(new_state, metrics, current, end, last_good, skip)
            state, current = new_state, end
            if "meta_loss" in metrics:
                loss = float(np.mean(metrics["meta_loss"]))
                running = loss if running is None else 0.9 * running + 0.1 * loss
                bar.set_postfix(loss=f"{running:.4f}")
            bar.update(n)
            if checkpointer is not None and (end == num_steps or end % checkpointer.every == 0):
                last_good = save(state)
            pending.add(metrics)
            ran = set()
            for i, hook in enumerate(hooks):
                if end % hook.every == 0 or end == num_steps and hook.at_end:
                    ran.add(i)
                    stop = hook.fn(StepInfo(end, state, pending.take(i), end == num_steps))
                    if stop is not None and stopped_by == "num_steps":
                        stopped_by = stop.reason
            if stopped_by != "num_steps" and end < num_steps:
                last_good = save(state)
                for i, hook in enumerate(hooks):
                    if i not in ran and hook.at_end:
                        hook.fn(StepInfo(end, state, pending.take(i), True))
                break
            if caught.get("signum") is not None and current < num_steps:
                last_good = save(state)
                raise Interrupted(caught["signum"], current, checkpointer is not None)
    return FitResult(state, stopped_by)
