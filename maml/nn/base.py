"""How a model meets a batch: per-example models are vmapped, batch models (batch norm with batch
statistics) take the whole batch; `apply` does either."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
from jaxtyping import Array

from .mlp import MLP


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
