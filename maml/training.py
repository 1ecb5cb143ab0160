"""The generic meta-training loop: run a jitted chunk of steps, report metrics, checkpoint, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, save_checkpoint
from .meta import MetaTrainState, SampledStep, TaskSampler, scan_steps


def _chunk_end(step: int, num_steps: int, steps_per_call: int, checkpoint_every: Optional[int]) -> int:
    """Next stopping point: a multiple of steps_per_call or of checkpoint_every, or the end."""
    end = min(num_steps, (step // steps_per_call + 1) * steps_per_call)
    if checkpoint_every:
        end = min(end, (step // checkpoint_every + 1) * checkpoint_every)
    return end


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
    progress: bool = True,
    desc: str = "meta-train",
) -> MetaTrainState:
    """Apply `step(state, sampler) -> (state, metrics)` until `state.step == num_steps`.

    `step` draws its tasks on device with `sampler` from `state.key` (see `maml.with_task_sampler`).

    Steps run `steps_per_call` at a time in one jitted `lax.scan`. With `checkpoint_dir`, training resumes
    from the newest checkpoint there, and checkpoints are written atomically every `checkpoint_every`
    steps and at the end. Chunk boundaries depend only on the step number, so a resumed run performs
    exactly the same computations as an uninterrupted one. `on_chunk(step, metrics)` gets each chunk's
    metrics as NumPy arrays with a leading step axis.
    """
    for name, value in (("num_steps", num_steps), ("steps_per_call", steps_per_call)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"fit: {name}={value!r}; expected a positive integer")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"fit: checkpoint_every={checkpoint_every!r}; expected a positive integer or None")
    if checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir, state)
        if found is not None:
            state = found[1]
    chunks: dict[int, Callable] = {}
    current = int(state.step)
    bar = tqdm(total=num_steps, initial=current, desc=desc, disable=not progress, dynamic_ncols=True)
    running = None
    try:
        while current < num_steps:
            end = _chunk_end(current, num_steps, steps_per_call, checkpoint_every)
            n = end - current
            if n not in chunks:
                chunks[n] = eqx.filter_jit(scan_steps(step, n))
            state, metrics = chunks[n](state, sampler)
            metrics = jax.tree.map(np.asarray, metrics)
            current = end
            if "meta_loss" in metrics:
                loss = float(np.mean(metrics["meta_loss"]))
                running = loss if running is None else 0.9 * running + 0.1 * loss
                bar.set_postfix(loss=f"{running:.4f}")
            bar.update(n)
            if checkpoint_dir is not None and (end == num_steps or (checkpoint_every and end % checkpoint_every == 0)):
                save_checkpoint(checkpoint_dir, end, state)
            if on_chunk is not None:
                on_chunk(end, metrics)
    finally:
        bar.close()
    return state
