"""How the meta-gradient is formed, as a value passed in (not an if-branch).

A strategy sees the inner loop's gradients and decides what the outer `jax.grad` may differentiate:
`SecondOrder` lets it through everything (exact MAML); `FirstOrder` stops the gradient through the inner
gradients (FOMAML: the adapted parameters are treated as `theta - lr * const`).

Three hooks, each with a default, let the rest of the family (`maml.family`, `maml.implicit`) be values too:
- `inner_gradient(grads)`: the gradient used in each inner SGD update;
- `adapt(inner, model, x, y, query)`: how the adapted model is produced (default: `inner.run`, the
  differentiable loop); iMAML replaces it by a proximal solve with an implicit derivative;
- `objective(model, task, inner)`: the per-task scalar whose `jax.grad` is the meta-gradient (default: the
  query loss after adaptation); the multi-step loss and Reptile replace it;
- `at_step(step)`: the strategy at meta-iteration `step` (a traced int), for annealed schedules;
  `make_train_step` calls it with `state.step`. Default: unchanged.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PyTree


class Adaptation(eqx.Module):
    """What an inner loop returns: the adapted model (same type as the model passed in), the support loss
    before each step `[K]`, the query loss after each step `[K]` (None unless a query set was passed),
    and strategy diagnostics (`aux`, a dict of arrays)."""

    model: PyTree
    support_losses: Float[Array, " K"]
    query_losses: Optional[Float[Array, " K"]] = None
    aux: dict = eqx.field(default_factory=dict)


class AbstractStrategy(eqx.Module):
    """Transforms the inner-loop gradient before the SGD update (and, optionally, the other hooks)."""

    @abc.abstractmethod
    def inner_gradient(self, grads: PyTree) -> PyTree:
        """Return the gradient used in the inner update (same structure as `grads`)."""

    def at_step(self, step: Int[Array, ""]) -> "AbstractStrategy":
        """This strategy at meta-iteration `step` (traced); unchanged unless it anneals something."""
        return self

    def adapt(self, inner: Any, model: PyTree, x: Array, y: Array, query: Any = None) -> Adaptation:
        """Adapt `model` on one task's support batch `(x, y)`; `query = (qx, qy)` adds per-step query losses."""
        return inner.run(model, x, y, strategy=self, query=query)

    def objective(self, model: PyTree, task: Any, inner: Any) -> tuple[Float[Array, ""], dict[str, Array]]:
        """`(scalar, aux)` for one task: the meta-gradient is `jax.grad` of the scalar w.r.t. `model`.

        Default: the query loss of the adapted model. aux: `support_losses` `[K]` and the strategy's own.
        """
        a = self.adapt(inner, model, task.support_x, task.support_y)
        return inner.query_loss(a.model, task.query_x, task.query_y), {"support_losses": a.support_losses, **a.aux}


class SecondOrder(AbstractStrategy):
    """Full second-order MAML: the outer gradient flows through the inner gradients (Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return grads


class FirstOrder(AbstractStrategy):
    """First-order MAML: inner gradients are constants to the outer gradient (no Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)
