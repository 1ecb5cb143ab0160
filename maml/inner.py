"""The inner loop: K differentiable SGD steps (`lax.scan`) on a support set."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .strategies import AbstractStrategy, SecondOrder

LossFn = Callable[[PyTree, Array, Array], Float[Array, ""]]


class InnerLoop(eqx.Module):
    """K steps of SGD on `loss_fn(model, x, y)`, adapting the leaves selected by `adapt_filter`.

    - `loss_fn(model, x, y) -> scalar`: the task loss; `x`, `y` are one task's batch (examples first).
    - `steps`: number of SGD steps K (0 means no adaptation).
    - `lr`: the inner learning rate.
    - `adapt_filter`: an Equinox filter (callable on leaves, or a pytree of bools shaped like the model)
      choosing which leaves adapt; the others stay at their meta-learned value (ANIL: only the head).
    """

    loss_fn: LossFn = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    lr: float
    adapt_filter: Any = eqx.field(static=True, default=eqx.is_inexact_array)

    def __check_init__(self):
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"InnerLoop: steps={self.steps!r}; expected an integer >= 0")
        if isinstance(self.lr, numbers.Real) and not self.lr > 0:
            raise ValueError(f"InnerLoop: lr={self.lr!r}; expected a positive number")

    def adapt(
        self, model: PyTree, x: Array, y: Array, *, strategy: AbstractStrategy = SecondOrder()
    ) -> tuple[PyTree, Float[Array, " steps"]]:
        """Adapt `model` on `(x, y)`; return the adapted model and the support loss before each step.

        Differentiable in `model` (to second order unless `strategy` says otherwise).
        """
        params, frozen = eqx.partition(model, self.adapt_filter)

        def step(p, _):
            loss, grads = jax.value_and_grad(lambda q: self.loss_fn(eqx.combine(q, frozen), x, y))(p)
            grads = strategy.inner_gradient(grads)
            p = jax.tree.map(lambda a, g: a - self.lr * g, p, grads)
            return p, loss

        params, losses = jax.lax.scan(step, params, None, length=self.steps, unroll=True)
        return eqx.combine(params, frozen), jnp.asarray(losses)

    def with_steps(self, steps: int) -> "InnerLoop":
        """The same inner loop with another number of steps (e.g. for evaluation)."""
        return InnerLoop(self.loss_fn, steps, self.lr, self.adapt_filter)
