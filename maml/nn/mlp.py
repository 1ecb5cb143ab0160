"""The fully connected network of the MAML paper's sinusoid experiment."""

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

    def batch(self, x: Float[Array, "N in"]) -> Float[Array, "N out"]:
        """The same function on a batch, as `x @ W.T + b` matmuls (`maml.apply` uses it).

        On CPUs this is about 1.4x faster inside a meta-step than `vmap` of `__call__`, whose per-example
        matrix-vector products XLA batches with extra transposes.
        """
        for layer in self.layers[:-1]:
            x = self.activation(x @ layer.weight.T + layer.bias)
        last = self.layers[-1]
        return x @ last.weight.T + last.bias
