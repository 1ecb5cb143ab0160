"""How a batch of tasks is mapped inside the compiled step: a value the caller picks.

`Vmap` batches every task into one computation (best on accelerators and for small models); `Map` runs
tasks one after another with `lax.map` (per-task gradients, constant memory in the batch size); on CPUs
convolutions whose weights differ per task are slow when vmapped (they become grouped convolutions).
"""

from __future__ import annotations

import abc
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .tasks import Task

TaskLoss = Callable[[PyTree, Task], Float[Array, ""]]


def _mean(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)


class AbstractBatching(eqx.Module):
    """Maps a per-task loss over a batch of tasks and returns the mean loss and its gradient."""

    @abc.abstractmethod
    def value_and_grad(
        self, task_loss: TaskLoss, model: PyTree, tasks: Task
    ) -> tuple[Float[Array, ""], PyTree]:
        """`task_loss(model, task) -> scalar`; return `(mean loss over tasks, its gradient)`.

        The gradient is taken with respect to the inexact-array leaves of `model`.
        """


class Vmap(AbstractBatching):
    """Gradient of the mean of `vmap`ped task losses: one batched computation."""

    def value_and_grad(self, task_loss, model, tasks):
        total = lambda m: jnp.mean(jax.vmap(lambda t: task_loss(m, t))(tasks))
        return eqx.filter_value_and_grad(total)(model)


class Map(AbstractBatching):
    """`lax.map` over tasks of each task's value and gradient, then the mean.

    `batch_size` tasks are vmapped together inside each map step (None: one at a time).
    """

    batch_size: Optional[int] = eqx.field(static=True, default=None)

    def value_and_grad(self, task_loss, model, tasks):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def one(t):
            f = lambda p: task_loss(eqx.combine(p, static), t)
            return jax.value_and_grad(f)(params)

        losses, grads = jax.lax.map(one, tasks, batch_size=self.batch_size)
        return jnp.mean(losses), _mean(grads)


class Unroll(AbstractBatching):
    """A Python loop over tasks inside the compiled step: each task's gradient is its own subgraph.

    Compile time grows with the batch size; XLA sees independent per-task graphs it can schedule freely.
    """

    def value_and_grad(self, task_loss, model, tasks):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        n = tasks.support_x.shape[0]
        outs = []
        for i in range(n):
            t = jax.tree.map(lambda a: a[i], tasks)
            f = lambda p: task_loss(eqx.combine(p, static), t)
            outs.append(jax.value_and_grad(f)(params))
        losses, grads = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return jnp.mean(losses), _mean(grads)


def convolution_batching(platform: str) -> AbstractBatching:
    """The batching of a convolutional model's tasks for `platform` (as `jax.default_backend()` names it).

    `Map` on "cpu": measured 1.8x the tasks per CPU-second of `Vmap` for Conv4 at meta-batch 32, at 171 MB
    instead of 4.8 GB (benchmarks/RESULTS.md), because per-task weights make vmapped convolutions grouped
    ones. `Vmap` elsewhere ("gpu", "tpu", ...): one batched program per step, the form accelerators run
    fastest. MLPs take `Vmap` everywhere.
    """
    if not isinstance(platform, str) or not platform:
        raise ValueError(f"platform: {platform!r}; expected a backend name such as 'cpu' or 'gpu'")
    return Map() if platform == "cpu" else Vmap()
