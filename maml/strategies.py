"""How the meta-gradient is formed, as a value passed in (not an if-branch).

A strategy sees the inner loop's gradients and decides what the outer `jax.grad` may differentiate:
`SecondOrder` lets it through everything (exact MAML); `FirstOrder` stops the gradient through the inner
gradients (FOMAML: the adapted parameters are treated as `theta - lr * const`).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
from jaxtyping import PyTree


class AbstractStrategy(eqx.Module):
    """Transforms the inner-loop gradient before the SGD update."""

    @abc.abstractmethod
    def inner_gradient(self, grads: PyTree) -> PyTree:
        """Return the gradient used in the inner update (same structure as `grads`)."""


class SecondOrder(AbstractStrategy):
    """Full second-order MAML: the outer gradient flows through the inner gradients (Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return grads


class FirstOrder(AbstractStrategy):
    """First-order MAML: inner gradients are constants to the outer gradient (no Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)
