"""Meta-objective and meta-training step: `meta_loss`, `meta_value_and_grad`, `make_train_step`."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .batching import AbstractBatching, Vmap
from .inner import InnerLoop
from .strategies import AbstractStrategy, SecondOrder
from .tasks import Task, check_batch


def meta_loss_and_aux(
    model: PyTree, task: Task, inner: InnerLoop, *, strategy: AbstractStrategy = SecondOrder()
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Query loss of `model` after `inner` adapts it on the support set, and diagnostics.

    aux: `support_loss` (before adaptation, scalar), `support_losses` ([K], before each inner step).
    """
    adapted, losses = inner.adapt(model, task.support_x, task.support_y, strategy=strategy)
    query_loss = inner.loss_fn(adapted, task.query_x, task.query_y)
    # The loss before the first inner step is already computed by the loop; reuse it when there is one.
    before = losses[0] if inner.steps > 0 else inner.loss_fn(model, task.support_x, task.support_y)
    return query_loss, {"support_loss": jax.lax.stop_gradient(before), "support_losses": losses}


def meta_loss(
    model: PyTree, task: Task, inner: InnerLoop, *, strategy: AbstractStrategy = SecondOrder()
) -> Float[Array, ""]:
    """The MAML objective for one task: query loss after `inner.steps` SGD steps on the support set.

    `jax.grad` of this with respect to `model` is the task's meta-gradient (second order by default).
    """
    adapted, _ = inner.adapt(model, task.support_x, task.support_y, strategy=strategy)
    return inner.loss_fn(adapted, task.query_x, task.query_y)


def meta_value_and_grad(
    model: PyTree,
    tasks: Task,
    inner: InnerLoop,
    *,
    strategy: AbstractStrategy = SecondOrder(),
    batching: AbstractBatching = Vmap(),
) -> tuple[tuple[Float[Array, ""], dict[str, Array]], PyTree]:
    """Mean meta-loss over a batch of tasks (leading axis B) and its gradient w.r.t. `model`'s arrays.

    Returns `((loss, aux), grads)` where aux holds per-task diagnostics with leading axis B.
    """
    check_batch(tasks)
    task_loss = lambda m, t: meta_loss_and_aux(m, t, inner, strategy=strategy)
    return batching.value_and_grad(task_loss, model, tasks)


class MetaTrainState(eqx.Module):
    """Everything that changes during meta-training; returned by each step, never mutated."""

    model: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_state(model: PyTree, optimizer: optax.GradientTransformation, key: PRNGKeyArray) -> MetaTrainState:
    """Initial training state: the outer optimiser sees every inexact array of `model`."""
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    return MetaTrainState(model, opt_state, jnp.zeros((), jnp.int32), key)


def make_train_step(
    optimizer: optax.GradientTransformation,
    inner: InnerLoop,
    *,
    strategy: AbstractStrategy = SecondOrder(),
    batching: AbstractBatching = Vmap(),
) -> Callable[[MetaTrainState, Task], tuple[MetaTrainState, dict[str, Array]]]:
    """One pure meta-training step `(state, tasks) -> (state, metrics)`; the caller jits it.

    metrics: `meta_loss` (mean query loss after adaptation) and `support_loss` (mean before adaptation).
    """

    def step(state: MetaTrainState, tasks: Task):
        (loss, aux), grads = meta_value_and_grad(
            state.model, tasks, inner, strategy=strategy, batching=batching
        )
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        metrics = {"meta_loss": loss, "support_loss": jnp.mean(aux["support_loss"])}
        return MetaTrainState(model, opt_state, state.step + 1, state.key), metrics

    return step


def with_task_sampler(
    step: Callable[[MetaTrainState, Task], tuple[MetaTrainState, dict[str, Array]]],
    sample_tasks: Callable[[PRNGKeyArray], Task],
) -> Callable[[MetaTrainState], tuple[MetaTrainState, dict[str, Array]]]:
    """Turn `step(state, tasks)` into `step(state)` that draws its tasks on device from `state.key`."""

    def sampled_step(state: MetaTrainState):
        key, sub = jax.random.split(state.key)
        return step(eqx.tree_at(lambda s: s.key, state, key), sample_tasks(sub))

    return sampled_step


def scan_steps(
    step: Callable[[MetaTrainState], tuple[MetaTrainState, dict[str, Array]]], num_steps: int
) -> Callable[[MetaTrainState], tuple[MetaTrainState, dict[str, Array]]]:
    """`num_steps` applications of a sampling step in one `lax.scan`; metrics get a leading axis."""

    def run(state: MetaTrainState):
        return jax.lax.scan(lambda s, _: step(s), state, None, length=num_steps)

    return run
