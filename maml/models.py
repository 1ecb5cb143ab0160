"""Equinox models. Per-example models (`MLP`) take one example and callers vmap; `apply` does it.
`PerStepConv4` is `Conv4` with MAML++ per-step batch norm (a `maml.AbstractPerStepModel`)."""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .inner import AbstractPerStepModel


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


class AbstractBatchModel(eqx.Module):
    """A model whose `__call__` takes a whole batch `[N, ...]` (e.g. batch norm with batch statistics)."""


def apply(model: Callable, x: Array) -> Array:
    """Predictions for a batch `x [N, ...]`: call a batch model directly, use an `MLP`'s batched form,
    vmap any other per-example model."""
    if isinstance(model, AbstractBatchModel):
        return model(x)
    if isinstance(model, MLP):
        return model.batch(x)
    return jax.vmap(model)(x)


class Conv4(AbstractBatchModel):
    """The MAML paper's Omniglot / mini-ImageNet network on a whole batch: `x [N, H, W, C] -> [N, classes]`.

    Four blocks of 3x3 SAME convolution (no bias), batch norm with the batch's own statistics (learned
    scale and offset, no running statistics), ReLU and 2x2 max-pool (VALID), then a linear head on the
    flattened `[s, s, filters]` features (`s = image_size` halved four times, rounding down).
    `conv_impl` picks each block's convolution (see `maml.layers.conv3x3`); "auto" uses im2col.
    """

    conv_weights: tuple[Float[Array, "3 3 cin cout"], ...]
    bn_scales: tuple[Float[Array, " cout"], ...]
    bn_offsets: tuple[Float[Array, " cout"], ...]
    head_weight: Float[Array, "features classes"]
    head_bias: Float[Array, " classes"]
    conv_impls: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        filters: int = 64,
        image_size: int = 28,
        *,
        conv_impl: str | Sequence[str] = "auto",
        key: PRNGKeyArray,
    ):
        from .layers import CONV_IMPLS

        for name, value, low in (
            ("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
            ("filters", filters, 1), ("image_size", image_size, 16),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Conv4: {name}={value!r}; expected an integer >= {low}")
        impls = (conv_impl,) * 4 if isinstance(conv_impl, str) else tuple(conv_impl)
        impls = tuple("im2col" if i == "auto" else i for i in impls)
        if len(impls) != 4 or any(i not in CONV_IMPLS for i in impls):
            raise ValueError(f"Conv4: conv_impl={conv_impl!r}; expected 'auto', one of {CONV_IMPLS}, or 4 of them")
        keys = jax.random.split(key, 5)
        weights, cin = [], in_channels
        for k in keys[:4]:
            bound = 1.0 / (9 * cin) ** 0.5  # PyTorch's default (Kaiming uniform, a=sqrt(5))
            weights.append(jax.random.uniform(k, (3, 3, cin, filters), minval=-bound, maxval=bound))
            cin = filters
        size = image_size
        for _ in range(4):
            size //= 2
        features = size * size * filters
        bound = 1.0 / features**0.5
        kw, kb = jax.random.split(keys[4])
        self.conv_weights = tuple(weights)
        self.bn_scales = tuple(jnp.ones((filters,)) for _ in range(4))
        self.bn_offsets = tuple(jnp.zeros((filters,)) for _ in range(4))
        self.head_weight = jax.random.uniform(kw, (features, num_classes), minval=-bound, maxval=bound)
        self.head_bias = jax.random.uniform(kb, (num_classes,), minval=-bound, maxval=bound)
        self.conv_impls = impls

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N classes"]:
        from .layers import batch_norm, conv3x3, max_pool_2x2

        cin = self.conv_weights[0].shape[2]
        if x.ndim != 4 or x.shape[-1] != cin:
            raise ValueError(f"Conv4: x has shape {tuple(x.shape)}; expected [N, H, W, {cin}] (NHWC)")
        for w, s, o, impl in zip(self.conv_weights, self.bn_scales, self.bn_offsets, self.conv_impls):
            x = max_pool_2x2(jax.nn.relu(batch_norm(conv3x3(x, w, impl), s, o)))
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.head_weight.shape[0]:
            raise ValueError(
                f"Conv4: x gives {x.shape[1]} features but the head expects {self.head_weight.shape[0]}; "
                "expected images of the image_size the model was built with"
            )
        return x @ self.head_weight + self.head_bias


class PerStepConv4(Conv4, AbstractPerStepModel):
    """`Conv4` with MAML++ per-step batch norm (Antoniou et al. 2019): each block's batch-norm scale and
    offset are `[S, filters]`, one row per inner step (S = `steps`, e.g. the inner steps + 1), and inner
    step k (its support loss, and the query loss after it) uses row k, clamped to the last row past S.

    `at_step(k)` is the network at step k: the same module with `[filters]` rows (the losses see it
    through `maml.network`). Calling the per-step model itself uses step 0. Convolutions and the head are
    shared by all steps; statistics are the batch's own, as in `Conv4` (so they are per step already).
    Built with the same key as a `Conv4`, it starts from that `Conv4`'s weights (every row the same).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        filters: int = 64,
        image_size: int = 28,
        *,
        steps: int,
        conv_impl: str | Sequence[str] = "auto",
        key: PRNGKeyArray,
    ):
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"PerStepConv4: steps={steps!r}; expected an integer >= 1 (rows of per-step batch norm)")
        super().__init__(in_channels, num_classes, filters, image_size, conv_impl=conv_impl, key=key)
        self.bn_scales = tuple(jnp.tile(s, (steps, 1)) for s in self.bn_scales)
        self.bn_offsets = tuple(jnp.tile(o, (steps, 1)) for o in self.bn_offsets)

    @property
    def per_step(self) -> bool:
        """Whether this holds every step's rows `[S, filters]` (False for an `at_step` view)."""
        return self.bn_scales[0].ndim == 2

    @property
    def steps(self) -> int:
        """S, the rows of per-step batch-norm parameters."""
        return self.bn_scales[0].shape[0] if self.per_step else 1

    def at_step(self, step) -> "PerStepConv4":
        if not self.per_step:
            return self
        k = jnp.clip(jnp.asarray(step, jnp.int32), 0, self.steps - 1)
        rows = lambda arrays: tuple(a[k] for a in arrays)
        return eqx.tree_at(lambda m: (m.bn_scales, m.bn_offsets), self, (rows(self.bn_scales), rows(self.bn_offsets)))

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N classes"]:
        if self.per_step:
            return self.at_step(0)(x)
        return super().__call__(x)
