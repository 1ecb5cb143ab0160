"""Derivative order of the meta-gradient: second order (exact MAML), first order (FOMAML), and MAML++'s
derivative-order annealing (first order for the first meta-iterations, then second order)."""

from __future__ import annotations

import numbers
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Int, PyTree

from .base import AbstractStrategy


class SecondOrder(AbstractStrategy):
    """Full second-order MAML: the outer gradient flows through the inner gradients (Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return grads


class FirstOrder(AbstractStrategy):
    """First-order MAML: inner gradients are constants to the outer gradient (no Hessian terms)."""

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)


class AnnealedOrder(AbstractStrategy):
    """MAML++ derivative-order annealing (Antoniou et al. 2019): first order for the first
    `first_order_steps` meta-iterations, then second order. One compiled program: the second-order graph is
    built throughout and its gradient is masked before the switch (a `where` on the inner gradient), so
    early steps cost as much as later ones.
    """

    first_order_steps: int = eqx.field(static=True)
    step: Union[int, Int[jax.Array, ""]] = 0

    def __check_init__(self):
        f = self.first_order_steps
        if not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 0:
            raise ValueError(f"AnnealedOrder: first_order_steps={f!r}; expected an integer >= 0")

    def at_step(self, step):
        return AnnealedOrder(self.first_order_steps, step)

    def inner_gradient(self, grads: PyTree) -> PyTree:
        second = jnp.asarray(self.step) >= self.first_order_steps
        return jax.tree.map(lambda g: jnp.where(second, g, jax.lax.stop_gradient(g)), grads)
