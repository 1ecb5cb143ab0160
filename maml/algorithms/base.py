"""The strategy base: how the meta-gradient is formed, as a value passed in (not an if-branch).

A strategy sees the inner loop's gradients and decides what the outer `jax.grad` may differentiate. Its
hooks, each with a default, let every member of the family be a value of the same `meta_loss` /
`make_train_step`:
- `inner_gradient(grads)`: the gradient used in each inner SGD update (what the outer gradient sees);
- `adapt(inner, model, x, y, query)`: how the adapted model is produced (default: `inner.run`, the
  differentiable loop); iMAML replaces it by a proximal solve with an implicit derivative;
- `objective(model, task, inner)`: the per-task scalar whose `jax.grad` is the meta-gradient (default: the
  query loss after adaptation); the multi-step loss and Reptile replace it;
- `at_step(step)`: the strategy at meta-iteration `step` (a traced int), for annealed schedules;
  `make_train_step` calls it with `state.step`. Default: unchanged.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, Int, PyTree

from ..inner import Adaptation, InnerLoop


class AbstractStrategy(eqx.Module):
    """Transforms the inner-loop gradient before the SGD update (and, optionally, the other hooks)."""

    @abc.abstractmethod
    def inner_gradient(self, grads: PyTree) -> PyTree:
        """Return the gradient used in the inner update (same structure as `grads`)."""

    def at_step(self, step: Int[Array, ""]) -> "AbstractStrategy":
        """This strategy at meta-iteration `step` (traced); unchanged unless it anneals something."""
        return self

    def adapt(self, inner: InnerLoop, model: PyTree, x: Array, y: Array, query: Any = None) -> Adaptation:
        """Adapt `model` on one task's support batch `(x, y)`; `query = (qx, qy)` adds per-step query losses."""
        return inner.run(model, x, y, inner_gradient=self.inner_gradient, query=query)

    def objective(self, model: PyTree, task: Any, inner: InnerLoop) -> tuple[Float[Array, ""], dict[str, Array]]:
        """`(scalar, aux)` for one task: the meta-gradient is `jax.grad` of the scalar w.r.t. `model`.

        Default: the query loss of the adapted model. aux: `support_losses` `[K]` and the strategy's own.
        """
        a = self.adapt(inner, model, task.support_x, task.support_y)
        return inner.query_loss(a.model, task.query_x, task.query_y), {"support_losses": a.support_losses, **a.aux}
