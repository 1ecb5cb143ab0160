"""Meta-learned inner learning rates: Meta-SGD (Li et al. 2017, one rate per parameter) and MAML++'s
LSLR (Antoniou et al. 2019, one rate per layer and per inner step), both as `LearnedLR`."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ..inner import AbstractLearnedRates, network


def _check_lr(name: str, lr: Any) -> None:
    if isinstance(lr, numbers.Real) and not lr > 0:
        raise ValueError(f"{name}={lr!r}; expected a positive number")


class LearnedLR(AbstractLearnedRates):
    """A network and its meta-learned inner learning rates, both meta-learned by the outer optimiser.

    `lr` has the structure of `eqx.filter(model, adapt_filter)` (None where a leaf does not adapt); each
    leaf is `[*param]` (Meta-SGD: one rate per parameter), `[]` (one per tensor) or, with `per_step`,
    `[S, *param]` / `[S]` (MAML++ LSLR: per layer and per step; step `k` uses `lr[k]`, clamped past S).
    The inner update is `p - lr * g`: rates are raw (may turn negative, as in Meta-SGD) and replace
    `InnerLoop.lr`. Adaptation returns a `LearnedLR` with the adapted network and the same rates.
    """

    model: PyTree
    lr: PyTree
    per_step: bool = eqx.field(static=True, default=False)

    @classmethod
    def per_parameter(cls, model: PyTree, init_lr: float, adapt_filter: Any = eqx.is_inexact_array) -> "LearnedLR":
        """Meta-SGD (Li et al. 2017): one rate per adapted parameter, all `init_lr`."""
        _check_lr("init_lr", init_lr)
        return cls(model, jax.tree.map(lambda a: jnp.full_like(a, init_lr), eqx.filter(model, adapt_filter)))

    @classmethod
    def per_parameter_uniform(
        cls, model: PyTree, low: float, high: float, *, key: PRNGKeyArray, adapt_filter: Any = eqx.is_inexact_array
    ) -> "LearnedLR":
        """Meta-SGD as Li et al. 2017 initialise it (section 4.1): one rate per adapted parameter, each drawn
        uniformly from `[low, high]` (they use [0.005, 0.1])."""
        _check_lr("low", low)
        if not high >= low:
            raise ValueError(f"LearnedLR.per_parameter_uniform: high={high!r}; expected >= low={low!r}")
        leaves, treedef = jax.tree.flatten(eqx.filter(model, adapt_filter))
        keys = jax.random.split(key, max(len(leaves), 1))
        rates = [jax.random.uniform(k, a.shape, a.dtype, low, high) for k, a in zip(keys, leaves)]
        return cls(model, jax.tree.unflatten(treedef, rates))

    @classmethod
    def per_layer(
        cls, model: PyTree, init_lr: float, steps: Optional[int] = None, adapt_filter: Any = eqx.is_inexact_array
    ) -> "LearnedLR":
        """One rate per adapted tensor (per layer), and per step when `steps` is given (LSLR)."""
        _check_lr("init_lr", init_lr)
        shape = () if steps is None else (steps,)
        if steps is not None and (not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"LearnedLR.per_layer: steps={steps!r}; expected an integer >= 1 or None")
        rates = jax.tree.map(lambda a: jnp.full(shape, init_lr, a.dtype), eqx.filter(model, adapt_filter))
        return cls(model, rates, per_step=steps is not None)

    @property
    def steps(self) -> Optional[int]:
        """S, the inner steps that have rates of their own (None: the same rates at every step)."""
        leaves = jax.tree.leaves(self.lr)
        return leaves[0].shape[0] if self.per_step and leaves else None

    def rates(self, step: Int[Array, ""]) -> PyTree:
        return jax.tree.map(lambda r: r[step], self.lr) if self.per_step else self.lr

    def largest_rate(self, step: int = 0) -> Array:
        """max |rate| of inner step `step`: with it, `largest_rate * lambda_max(H)` bounds the spectral radius
        of the inner step's `diag(rates) H` (the stability figure of a quadratic model)."""
        return jnp.max(jnp.stack([jnp.max(jnp.abs(r)) for r in jax.tree.leaves(self.rates(step))]))

    def __call__(self, *args, **kwargs):
        """The network's output (for plotting / per-example use; losses see `network(model, k)`)."""
        return network(self)(*args, **kwargs)
