"""MAML++'s multi-step loss (Antoniou et al. 2019): the objective weighs the query loss after every inner
step, with weights annealed towards the final step; and MAML++'s outer optimiser, Adam with a cosine rate."""

from __future__ import annotations

import numbers
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from .base import AbstractStrategy
from .order import AnnealedOrder, FirstOrder, SecondOrder


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r}; expected an integer >= {low}")


def msl_weights(
    steps: int, progress: Union[float, Float[Array, ""]], min_weight: float = 0.03
) -> Float[Array, " steps"]:
    """MAML++ multi-step loss weights over `steps` query losses at training `progress` in [0, 1].

    Uniform `1/K` at 0; the non-final weights fall linearly to `min_weight/K`, the final one rises to
    `1 - (K-1) min_weight/K`; from progress 1 on, only the final loss counts (Antoniou et al. 2019).
    """
    _check_int("msl_weights: steps", steps, 1)
    k = steps
    p = jnp.asarray(progress, dtype=jnp.result_type(float))
    early = jnp.maximum(1.0 / k - p / k, min_weight / k)
    final = jnp.minimum(1.0 / k + p * (k - 1) / k, 1.0 - (k - 1) * min_weight / k)
    annealed = jnp.concatenate([jnp.full((k - 1,), early), final[None]])
    return jnp.where(p < 1.0, annealed, jax.nn.one_hot(k - 1, k, dtype=annealed.dtype))


class MultiStepLoss(AbstractStrategy):
    """MAML++ multi-step loss: the objective is `sum_k w_k(step) * query_loss(after step k)`, with
    `msl_weights(K, step / anneal_steps)`; differentiated as `base` says (`SecondOrder`, `FirstOrder`
    or `AnnealedOrder`). `step` is set by `at_step` (by `make_train_step`); outside training it is 0.
    """

    base: AbstractStrategy = SecondOrder()
    anneal_steps: int = eqx.field(static=True, default=10_000)
    min_weight: float = eqx.field(static=True, default=0.03)
    step: Union[int, Int[Array, ""]] = 0

    def __check_init__(self):
        if not isinstance(self.base, (SecondOrder, FirstOrder, AnnealedOrder)):
            raise ValueError(
                f"MultiStepLoss: base={type(self.base).__name__}(); expected SecondOrder, FirstOrder or "
                "AnnealedOrder (the per-step query losses must come from the differentiable inner loop)"
            )
        _check_int("MultiStepLoss: anneal_steps", self.anneal_steps, 1)

    def at_step(self, step):
        return MultiStepLoss(self.base.at_step(step), self.anneal_steps, self.min_weight, step)

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return self.base.inner_gradient(grads)

    def adapt(self, inner, model, x, y, query=None):
        return self.base.adapt(inner, model, x, y, query)

    def objective(self, model, task, inner):
        if inner.steps < 1:
            raise ValueError(f"MultiStepLoss: inner.steps={inner.steps}; expected >= 1 (one loss per step)")
        a = self.adapt(inner, model, task.support_x, task.support_y, (task.query_x, task.query_y))
        w = msl_weights(inner.steps, jnp.asarray(self.step) / self.anneal_steps, self.min_weight)
        return jnp.sum(w * a.query_losses), {"support_losses": a.support_losses, "query_losses": a.query_losses}


def cosine_adam(lr: float, decay_steps: int, min_lr: float = 1e-5) -> optax.GradientTransformation:
    """MAML++'s outer optimiser: Adam with the rate cosine-annealed from `lr` to `min_lr` over `decay_steps`."""
    if not lr > 0 or not 0 <= min_lr <= lr:
        raise ValueError(f"cosine_adam: lr={lr!r}, min_lr={min_lr!r}; expected 0 <= min_lr <= lr and lr > 0")
    _check_int("cosine_adam: decay_steps", decay_steps, 1)
    return optax.adam(optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr))
