"""The MAML family as values: ANIL's filter, MAML++'s annealed strategies, Reptile, outer optimisers.

Each is passed to the same `meta_loss` / `make_train_step`:
- ANIL: `InnerLoop(..., adapt_filter=head_filter(model))` (only the head adapts; the body is meta-learned).
- Meta-SGD / MAML++ LSLR: wrap the model in `maml.LearnedLR` (rates are meta-learned leaves).
- MAML++ multi-step loss: `MultiStepLoss(base, anneal_steps)`; derivative-order annealing:
  `AnnealedOrder(first_order_steps)` (as `base` or alone); per-step batch norm: an
  `AbstractPerStepModel`; cosine outer rate: `cosine_adam(lr, steps)`.
- Reptile: `Reptile()` with an outer optax transformation of `initial - adapted` (`reptile_sgd`).
- iMAML: `maml.Implicit` (in `maml.implicit`).
"""

from __future__ import annotations

import numbers
from typing import Any, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from .inner import LearnedLR
from .strategies import AbstractStrategy, FirstOrder, SecondOrder


def head_filter(model: PyTree) -> PyTree:
    """ANIL's adapt filter: a pytree of bools shaped like `model`, True only on the final linear layer.

    Supports models with `layers` ending in an `eqx.nn.Linear` (`maml.MLP`) and models with
    `head_weight` / `head_bias` fields (`maml.Conv4`); a `LearnedLR` is looked through.
    """
    net = model.model if isinstance(model, LearnedLR) else model
    base = jax.tree.map(lambda _: False, net)
    layers = getattr(net, "layers", None)
    if isinstance(layers, (tuple, list)) and layers and isinstance(layers[-1], eqx.nn.Linear):
        return eqx.tree_at(lambda m: m.layers[-1], base, jax.tree.map(lambda _: True, layers[-1]))
    if hasattr(net, "head_weight") and hasattr(net, "head_bias"):
        return eqx.tree_at(lambda m: (m.head_weight, m.head_bias), base, (True, True))
    raise ValueError(
        f"head_filter: model is a {type(net).__name__}; expected `layers` ending in an eqx.nn.Linear "
        "or `head_weight`/`head_bias` fields (pass your own adapt_filter otherwise)"
    )


def _check_int(name: str, value: Any, low: int) -> None:
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


class AnnealedOrder(AbstractStrategy):
    """MAML++ derivative-order annealing: first order for the first `first_order_steps` meta-iterations,
    then second order. One compiled program: the second-order graph is built throughout and its gradient
    is masked before the switch (a `where` on the inner gradient), so early steps cost as much as later ones.
    """

    first_order_steps: int = eqx.field(static=True)
    step: Union[int, Int[Array, ""]] = 0

    def __check_init__(self):
        _check_int("AnnealedOrder: first_order_steps", self.first_order_steps, 0)

    def at_step(self, step):
        return AnnealedOrder(self.first_order_steps, step)

    def inner_gradient(self, grads: PyTree) -> PyTree:
        second = jnp.asarray(self.step) >= self.first_order_steps
        return jax.tree.map(lambda g: jnp.where(second, g, jax.lax.stop_gradient(g)), grads)


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


class Reptile(AbstractStrategy):
    """Reptile (Nichol et al. 2018): the inner loop is not differentiated; the task's "meta-gradient" is
    `initial - adapted` (of the adapted leaves), so an outer `optax.sgd(eps)` moves toward the adapted
    parameters. The objective's value is the query loss after adaptation (for monitoring); its gradient is
    that of the surrogate `1/2 ||theta - stop_gradient(adapted)||^2`.
    """

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)

    def objective(self, model, task, inner):
        if isinstance(model, LearnedLR):
            raise ValueError(
                "Reptile: model is a LearnedLR; Reptile's direction (initial - adapted) gives learned inner "
                "learning rates no gradient (use MAML-style strategies for Meta-SGD / LSLR)"
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
    _check_int("reptile_sgd: decay_steps", decay_steps, 0)
    rate = optax.linear_schedule(step_size, final_step_size, decay_steps) if decay_steps else step_size
    return optax.sgd(rate)


def cosine_adam(lr: float, decay_steps: int, min_lr: float = 1e-5) -> optax.GradientTransformation:
    """MAML++'s outer optimiser: Adam with the rate cosine-annealed from `lr` to `min_lr` over `decay_steps`."""
    if not lr > 0 or not 0 <= min_lr <= lr:
        raise ValueError(f"cosine_adam: lr={lr!r}, min_lr={min_lr!r}; expected 0 <= min_lr <= lr and lr > 0")
    _check_int("cosine_adam: decay_steps", decay_steps, 1)
    return optax.adam(optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr))
