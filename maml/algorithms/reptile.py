"""Reptile (Nichol et al. 2018): move the initialisation towards each task's adapted parameters."""

from __future__ import annotations

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from ..inner import AbstractLearnedRates
from .base import AbstractStrategy


class Reptile(AbstractStrategy):
    """Reptile: the inner loop is not differentiated; the task's "meta-gradient" is `initial - adapted` (of
    the adapted leaves), so an outer `optax.sgd(eps)` moves toward the adapted parameters. The objective's
    value is the query loss after adaptation (for monitoring); its gradient is that of the surrogate
    `1/2 ||theta - stop_gradient(adapted)||^2`.
    """

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)

    def objective(self, model, task, inner):
        if isinstance(model, AbstractLearnedRates):
            raise ValueError(
                f"Reptile: model is a {type(model).__name__}; Reptile's direction (initial - adapted) gives "
                "learned inner learning rates no gradient (use MAML-style strategies for Meta-SGD / LSLR)"
            )
        a = self.adapt(inner, model, task.support_x, task.support_y)
        theta = eqx.filter(model, eqx.is_inexact_array)
        target = jax.lax.stop_gradient(eqx.filter(a.model, eqx.is_inexact_array))
        sq = lambda t: 0.5 * sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(t), jax.tree.leaves(target)))
        surrogate = sq(theta)
        query = jax.lax.stop_gradient(inner.query_loss(a.model, task.query_x, task.query_y))
        return query + (surrogate - jax.lax.stop_gradient(surrogate)), {"support_losses": a.support_losses}


def reptile_sgd(step_size: float, final_step_size: float = 0.0, decay_steps: int = 0) -> optax.GradientTransformation:
    """Reptile's outer update as optax: `theta <- theta + eps (mean adapted - theta)` from the pseudo-
    gradient `initial - adapted`; `eps` anneals linearly to `final_step_size` over `decay_steps` (0: constant)."""
    if not step_size > 0:
        raise ValueError(f"reptile_sgd: step_size={step_size!r}; expected a positive number")
    if not isinstance(decay_steps, numbers.Integral) or isinstance(decay_steps, bool) or decay_steps < 0:
        raise ValueError(f"reptile_sgd: decay_steps={decay_steps!r}; expected an integer >= 0")
    rate = optax.linear_schedule(step_size, final_step_size, decay_steps) if decay_steps else step_size
    return optax.sgd(rate)
