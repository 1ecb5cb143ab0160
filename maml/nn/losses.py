"""Task losses with the signature the inner loop expects: `loss_fn(model, x, y) -> scalar`."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from .base import apply


def mse(model: Callable, x: Float[Array, "N ..."], y: Float[Array, "N ..."]) -> Float[Array, ""]:
    """Mean squared error of `model` on a batch; differentiable in `model`."""
    return jnp.mean((apply(model, x) - y) ** 2)


def cross_entropy(model: Callable, x: Array, y: Int[Array, " N"]) -> Float[Array, ""]:
    """Mean softmax cross-entropy of `model`'s logits `[N, classes]` against integer labels `y [N]`."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(model, x), y))


def accuracy(model: Callable, x: Array, y: Int[Array, " N"]) -> Float[Array, ""]:
    """Fraction of `x` whose arg-max logit is the label `y`."""
    return jnp.mean(jnp.argmax(apply(model, x), axis=-1) == y)
