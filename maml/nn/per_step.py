"""MAML++ per-step parameters (Antoniou et al. 2019) for any network: chosen leaves get one row per inner
step, e.g. per-step batch norm."""

from __future__ import annotations

import numbers
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from ..inner import AbstractPerStepModel


def norm_params(model: PyTree) -> PyTree:
    """The normalisation parameters of a model that lists them (`model.norm_params()`, e.g. `Conv4`'s)."""
    return model.norm_params()


class PerStep(AbstractPerStepModel):
    """A network whose leaves selected by `where` have one row per inner step `[S, ...]`.

    Inner step k (its support loss, and the query loss after it) uses `at_step(k)`: the network with row k
    of each of those leaves, clamped to the last row past S (a row S would never be trained, so extra
    evaluation steps keep the last trained row). Built from a network, every row starts at the network's
    own values. With the default `where` (`norm_params`) a `Conv4` gets MAML++'s per-step batch norm:
    convolutions and the head are shared by all steps; statistics are the batch's own, so they are per
    step already. Calling the wrapper itself uses step 0.
    """

    model: PyTree  # the network, its per-step leaves stacked [S, ...]
    steps: int = eqx.field(static=True)
    where: Callable[[PyTree], PyTree] = eqx.field(static=True, default=norm_params)

    def __init__(self, model: PyTree, steps: int, where: Callable[[PyTree], PyTree] = norm_params):
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"PerStep: steps={steps!r}; expected an integer >= 1 (rows of per-step parameters)")
        stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (steps, *a.shape)), where(model))
        self.model = eqx.tree_at(where, model, stacked)
        self.steps = steps
        self.where = where

    def at_step(self, step: Int[Array, ""]) -> PyTree:
        k = jnp.clip(jnp.asarray(step, jnp.int32), 0, self.steps - 1)
        rows = jax.tree.map(lambda a: a[k], self.where(self.model))
        return eqx.tree_at(self.where, self.model, rows)

    def __call__(self, x: Float[Array, "N ..."]) -> Array:
        return self.at_step(0)(x)
