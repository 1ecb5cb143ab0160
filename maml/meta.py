"""Meta-objective and meta-training step: `meta_loss`, `meta_value_and_grad`, `make_train_step`."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .algorithms.base import AbstractStrategy
from .algorithms.order import SecondOrder
from .batching import AbstractBatching, Vmap
from .inner import InnerLoop, network
from .tasks import Task, check_batch


def meta_loss_and_aux(
    model: PyTree, task: Task, inner: InnerLoop, *, strategy: AbstractStrategy = SecondOrder()
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Query loss of `model` after `inner` adapts it on the support set, and diagnostics.

    aux: `support_loss` (before adaptation, scalar), `support_losses` ([K], before each inner step), and
    the strategy's own (e.g. `cg_residual` for `maml.Implicit`).
    """
    loss, aux = strategy.objective(model, task, inner)
    losses = aux["support_losses"]
    # The loss before the first inner step is already computed by the loop; reuse it when there is one.
    before = losses[0] if inner.steps > 0 else inner.loss_fn(network(model, 0), task.support_x, task.support_y)
    return loss, {**aux, "support_loss": jax.lax.stop_gradient(before), "support_losses": losses}


def meta_loss(
    model: PyTree, task: Task, inner: InnerLoop, *, strategy: AbstractStrategy = SecondOrder()
) -> Float[Array, ""]:
    """The MAML objective for one task: query loss after `inner.steps` SGD steps on the support set.

    `jax.grad` of this with respect to `model` is the task's meta-gradient (second order by default;
    `strategy.objective` says what is differentiated: e.g. a weighted multi-step loss, Reptile's surrogate).
    """
    return strategy.objective(model, task, inner)[0]


def adaptation_curve(
    model: PyTree, task: Task, inner: InnerLoop, *, strategy: AbstractStrategy = SecondOrder()
) -> Float[Array, " steps+1"]:
    """Query loss of one task before adaptation and after each of `inner.steps` steps: `[K + 1]`.

    Adapts as `strategy` does (learned rates, filters, proximal term); for evaluation, not differentiated.
    """
    a = strategy.adapt(inner, model, task.support_x, task.support_y, query=(task.query_x, task.query_y))
    before = inner.loss_fn(network(model, 0), task.query_x, task.query_y)
    return jax.lax.stop_gradient(jnp.concatenate([before[None], a.query_losses]))


def meta_value_and_grad(
    model: PyTree,
    tasks: Task,
    inner: InnerLoop,
    *,
    strategy: AbstractStrategy = SecondOrder(),
    batching: AbstractBatching = Vmap(),
) -> tuple[Float[Array, ""], PyTree]:
    """Mean meta-loss over a batch of tasks (leading axis B) and its gradient w.r.t. `model`'s arrays.

    Returns `(loss, grads)`; `grads` has `model`'s structure (None where a leaf is not an inexact array).
    """
    check_batch(tasks)
    task_loss = lambda m, t: meta_loss(m, t, inner, strategy=strategy)
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

    `strategy.at_step(state.step)` is used at each step (annealed strategies: MAML++ multi-step loss
    weights, derivative-order annealing). metrics: `meta_loss`, the mean query loss after adaptation.
    (Only that: on small models every extra output measurably slows the step; `meta_loss_and_aux` gives
    support-loss diagnostics, and iMAML's `cg_residual`, for evaluation.)
    """

    def step(state: MetaTrainState, tasks: Task):
        loss, grads = meta_value_and_grad(
            state.model, tasks, inner, strategy=strategy.at_step(state.step), batching=batching
        )
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        return MetaTrainState(model, opt_state, state.step + 1, state.key), {"meta_loss": loss}

    return step


TaskSampler = Callable[[PRNGKeyArray], Task]
SampledStep = Callable[[MetaTrainState, TaskSampler], tuple[MetaTrainState, dict[str, Array]]]


def with_task_sampler(
    step: Callable[[MetaTrainState, Task], tuple[MetaTrainState, dict[str, Array]]],
) -> SampledStep:
    """Turn `step(state, tasks)` into `step(state, sampler)` drawing its tasks on device from `state.key`.

    `sampler: key -> Task` is an argument (a pytree, e.g. an `eqx.Module` holding the dataset), not a
    closure, so a dataset stays a device buffer instead of becoming a constant of the compiled program.
    """

    def sampled_step(state: MetaTrainState, sampler: TaskSampler):
        key, sub = jax.random.split(state.key)
        return step(eqx.tree_at(lambda s: s.key, state, key), sampler(sub))

    return sampled_step


def scan_steps(step: SampledStep, num_steps: int) -> SampledStep:
    """`num_steps` applications of a sampling step in one `lax.scan`; metrics get a leading step axis."""

    def run(state: MetaTrainState, sampler: TaskSampler):
        return jax.lax.scan(lambda s, _: step(s, sampler), state, None, length=num_steps)

    return run
