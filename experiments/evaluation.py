"""Evaluation of meta-trained models on held-out few-shot tasks: adapt each task as the algorithm does,
measure the query accuracy, and summarise with a 95% interval."""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import numpy as np

import maml
from data.episodes import episode_sampler

BLOCK = 100  # tasks drawn and evaluated per compiled call (task i of block b: fold_in(fold_in(key, b), i))


class Episodes(NamedTuple):
    """N-way K-shot episodes with Q queries per class."""

    ways: int
    shots: int
    queries: int


draw = eqx.filter_jit(lambda sampler, key: sampler(key))
"""`sampler(key)` compiled, with the sampler (and its images) an argument rather than a constant."""


@eqx.filter_jit
def accuracies(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy) -> jax.Array:
    """Query accuracy `[B]` after `inner` adapts `model` to each task as `strategy` does (learned rates, ANIL's
    filter, iMAML's proximal term; per-step networks at the last step), `lax.map`: one task at a time."""

    def one(task: maml.Task) -> jax.Array:
        adapted = strategy.adapt(inner, model, task.support_x, task.support_y).model
        net = maml.network(adapted, max(inner.steps - 1, 0))  # what the query loss sees after adapting
        return maml.nn.accuracy(net, task.query_x, task.query_y)

    return jax.lax.map(one, tasks)


def task_accuracies(model, images, episodes: Episodes, key: jax.Array, num_tasks: int, inner: maml.InnerLoop,
                    strategy: maml.AbstractStrategy) -> np.ndarray:
    """Per-task query accuracy `[num_tasks]` on tasks drawn from the class-major `images` (the draw depends
    only on `key` and the count), adapting with `inner` as `strategy` does."""
    block = min(BLOCK, num_tasks)
    sampler = episode_sampler(images, *episodes, block)
    parts = [np.asarray(accuracies(model, draw(sampler, jax.random.fold_in(key, b)), inner, strategy))
             for b in range(math.ceil(num_tasks / block))]
    return np.concatenate(parts)[:num_tasks]


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (NaN for a single value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), 1.96 * std / math.sqrt(len(values))
