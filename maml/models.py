"""Equinox models. Per-example models (`MLP`) take one example and callers vmap; `apply` does it."""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray


class MLP(eqx.Module):
    """Fully connected network on one example: `x [in] -> [out]`, `activation` between layers.

    The MAML paper's sinusoid model is `MLP(1, 1, (40, 40), key=key)` with ReLU.
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: Sequence[int] = (40, 40),
        activation: Callable = jax.nn.relu,
        *,
        key: PRNGKeyArray,
    ):
        sizes = [in_size, *hidden, out_size]
        for s in sizes:
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"MLP: layer sizes {sizes}; expected positive integers")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))
        self.activation = activation

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class AbstractBatchModel(eqx.Module):
    """A model whose `__call__` takes a whole batch `[N, ...]` (e.g. batch norm with batch statistics)."""


def apply(model: Callable, x: Array) -> Array:
    """Predictions for a batch `x [N, ...]`: vmap a per-example model, call a batch model directly."""
    if isinstance(model, AbstractBatchModel):
        return model(x)
    return jax.vmap(model)(x)
