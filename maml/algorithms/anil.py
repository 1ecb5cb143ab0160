"""ANIL (Raghu et al. 2020): only the head adapts in the inner loop; the body is meta-learned."""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import PyTree

from ..inner import AbstractLearnedRates, AbstractPerStepModel


def _head(net: PyTree):
    """`where` selecting the head of `net` for `eqx.tree_at`."""
    layers = getattr(net, "layers", None)
    if isinstance(layers, (tuple, list)) and layers and isinstance(layers[-1], eqx.nn.Linear):
        return lambda m: m.layers[-1]
    if hasattr(net, "head_weight") and hasattr(net, "head_bias"):
        return lambda m: (m.head_weight, m.head_bias)
    if isinstance(net, AbstractPerStepModel) and hasattr(net, "model"):
        inner = _head(net.model)
        return lambda m: inner(m.model)
    raise ValueError(
        f"head_filter: model is a {type(net).__name__}; expected `layers` ending in an eqx.nn.Linear "
        "or `head_weight`/`head_bias` fields (pass your own adapt_filter otherwise)"
    )


def head_filter(model: PyTree) -> PyTree:
    """ANIL's adapt filter: a pytree of bools shaped like the network, True only on its final linear layer.

    Supports models with `layers` ending in an `eqx.nn.Linear` (`maml.nn.MLP`) and models with
    `head_weight` / `head_bias` fields (`maml.nn.Conv4`); learned rates (`maml.LearnedLR`) and per-step
    wrappers (`maml.nn.PerStep`) are looked through. Use it as `InnerLoop(adapt_filter=head_filter(model))`.
    """
    net = model.model if isinstance(model, AbstractLearnedRates) else model
    base = jax.tree.map(lambda _: False, net)
    where = _head(net)
    return eqx.tree_at(where, base, jax.tree.map(lambda _: True, where(base)))
