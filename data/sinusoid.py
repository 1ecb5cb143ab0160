"""The MAML paper's sinusoid regression tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
x ~ U[-5, 5]. Sampled on device from a key (inside the jitted step)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from maml import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
X_RANGE = (-5.0, 5.0)


def _indices(start: int | Int[Array, ""], num_tasks: int) -> Int[Array, " B"]:
    return start + jnp.arange(num_tasks, dtype=jnp.int32)


def _task_uniforms(key: PRNGKeyArray, num_tasks: int, count: int, start: int | Int[Array, ""]) -> Float[Array, "B count"]:
    """`count` U[0, 1) numbers per task; task i's come from `fold_in(key, i)` alone.

    One batched fold-in and one batched draw (each a threefry hash, a loop on CPU): sampling stays a
    small part of the sinusoid meta-step.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(_indices(start, num_tasks))
    return jax.vmap(lambda k: jax.random.uniform(k, (count,)))(keys)


def _scale(u: Array, bounds: tuple[float, float]) -> Array:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def sample_functions(
    key: PRNGKeyArray, num_tasks: int, start: int | Int[Array, ""] = 0
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Amplitudes and phases of tasks `start .. start+num_tasks-1`; task i uses `fold_in(key, i)`.

    Folding in the task index makes task i the same however a batch is split across devices.
    """
    u = _task_uniforms(key, num_tasks, 2, start)
    return _scale(u[:, 0], AMPLITUDE), _scale(u[:, 1], PHASE)


def sine(amp: Float[Array, ""], phase: Float[Array, ""], x: Float[Array, "N 1"]) -> Float[Array, "N 1"]:
    return amp * jnp.sin(x - phase)


def sample_tasks(
    key: PRNGKeyArray, num_tasks: int, shots: int, queries: int, start: int | Int[Array, ""] = 0
) -> tuple[Task, Float[Array, " B"], Float[Array, " B"]]:
    """A batch of tasks: `support [B, shots, 1]`, `query [B, queries, 1]`; also their amplitudes and phases.

    The batch holds tasks `start .. start+B-1` (B = `num_tasks`), task i drawn from `fold_in(key, i)`
    (its amplitude and phase are those of `sample_functions`, whatever `shots` and `queries` are).
    """
    u = _task_uniforms(key, num_tasks, 2 + shots + queries, start)
    amp, phase = _scale(u[:, 0], AMPLITUDE), _scale(u[:, 1], PHASE)
    x = _scale(u[:, 2:, None], X_RANGE)
    y = jax.vmap(sine)(amp, phase, x)
    task = Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
    return task, amp, phase


class SinusoidTasks(eqx.Module):
    """`key -> Task` sampler of `num_tasks` sinusoid tasks (for `maml.with_task_sampler` / `maml.fit`).

    `sample_range` gives a slice of that batch, so the parallel steps of `maml.parallel` can split it
    across devices (see the sampler protocol there).
    """

    num_tasks: int = eqx.field(static=True)
    shots: int = eqx.field(static=True)
    queries: int = eqx.field(static=True)

    def __call__(self, key: PRNGKeyArray) -> Task:
        return sample_tasks(key, self.num_tasks, self.shots, self.queries)[0]

    def sample_range(self, key: PRNGKeyArray, start: int | Int[Array, ""], count: int) -> Task:
        """Tasks `start .. start+count-1` of the batch `self(key)` draws: leading axis `count`."""
        return sample_tasks(key, count, self.shots, self.queries, start)[0]
