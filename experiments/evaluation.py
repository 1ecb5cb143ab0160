"""Evaluation of meta-trained models on held-out tasks that never hides a divergence.

Each task is adapted as the algorithm adapts at evaluation, for each requested number of steps. A task whose
adaptation diverged (query loss non-finite, or above `DIVERGENCE_FACTOR` times its value before adapting) is
counted, not averaged in: every figure is the mean over the other tasks, with the number and fraction that
diverged; for those the inner stability figure `rate x lambda_max(support-loss Hessian)` says why (above 2
the first step diverges on a quadratic model). No mean over a non-finite value reaches results.json.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from data.episodes import check_episode_args, episode_sampler

BLOCK = 100  # tasks drawn and evaluated per compiled call (task i of block b: fold_in(fold_in(key, b), i))
DIVERGENCE_FACTOR = 1000.0
DIVERGED = (f"query loss non-finite or above {DIVERGENCE_FACTOR:g}x its value before adapting")


class Episodes(NamedTuple):
    """N-way K-shot episodes with Q queries per class; `rotate`: rotations by 90 degrees as new classes (the
    Omniglot convention; off for natural images)."""

    ways: int
    shots: int
    queries: int
    rotate: bool = True

    def sampler(self, images, num_tasks: int):
        """`data.episodes.episode_sampler` of these episodes from class-major `images`, `num_tasks` per draw."""
        return episode_sampler(images, self.ways, self.shots, self.queries, num_tasks, rotate=self.rotate)

    def check(self, images_shape: tuple[int, ...]) -> None:
        """A one-line ValueError unless images of `images_shape` can give these episodes."""
        check_episode_args(images_shape, self.ways, self.shots, self.queries, self.rotate)


draw = eqx.filter_jit(lambda sampler, key: sampler(key))
"""`sampler(key)` compiled, with the sampler (and its images) an argument rather than a constant."""


def diverged(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Which tasks diverged: `after` (query losses `[B, S]`) non-finite or above `DIVERGENCE_FACTOR` x
    `before` (`[B]`, the query loss before adapting)."""
    scale = np.maximum(np.abs(before), 1e-12)[:, None]
    return ~np.isfinite(after) | (after > DIVERGENCE_FACTOR * scale)


def mean_ci95(values: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """Mean and the half-width of its normal 95% interval; None where there is no value (NaN-free)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return None, None
    ci = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(values.size) if values.size > 1 else None
    return float(np.mean(values)), ci


def summarise(values: np.ndarray, bad: np.ndarray, steps: Sequence[int]) -> dict:
    """Per step count: the mean and 95% interval of `values [B, S]` over the tasks that did not diverge
    (`bad [B, S]`), the number and the fraction that did."""
    out = {}
    for j, k in enumerate(steps):
        mean, ci = mean_ci95(values[~bad[:, j], j])
        out[str(k)] = {"mean": mean, "ci95": ci, "diverged": int(bad[:, j].sum()),
                       "diverged_fraction": float(bad[:, j].mean())}
    return out


def stability(model, tasks: maml.Task, inner: maml.InnerLoop, rate_bound: float, key: jax.Array) -> np.ndarray:
    """`rate_bound x lambda_max` of each task's support-loss Hessian at the network the inner loop starts
    from (over the leaves it adapts); `[B]`."""
    net = maml.network(model, 0)

    @eqx.filter_jit
    def top(net, tasks, key):
        def one(task, k):
            f, params = maml.curvature.support_objective(net, task, inner)
            return maml.curvature.top_eigenvalues(f, params, 1, key=k, num_iters=20).values[0]

        return jax.lax.map(lambda tk: one(*tk), (tasks, jax.random.split(key, tasks.support_x.shape[0])))

    return rate_bound * np.asarray(top(net, tasks, key))


class TaskResults(NamedTuple):
    """Per task: the query metric `[B, S]` and loss `[B, S]` after each of `steps` steps, the query loss before
    adapting `[B]`."""

    metric: np.ndarray
    loss: np.ndarray
    before: np.ndarray
    steps: tuple[int, ...]

    @property
    def bad(self) -> np.ndarray:
        return diverged(self.before, self.loss)


def all_at_once(f: Callable, xs):
    """`jax.vmap(f)(xs)`, with the call shape of `lax.map` (for `adapt_and_measure`'s `over`)."""
    return jax.vmap(f)(xs)


def adapt_and_measure(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy,
                      steps: Sequence[int], metric: Callable, over: Callable = jax.lax.map
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`metric` and `inner.loss_fn` on each task's query set after `k` steps of adaptation for each `k` in
    `steps` (adapting as `strategy` does; per-step networks at the last step), and the loss before; mapped
    over the tasks by `over` (`lax.map`: one at a time, `all_at_once`: vmapped)."""

    def one(task: maml.Task):
        before = inner.loss_fn(maml.network(model, 0), task.query_x, task.query_y)
        outs = []
        for k in steps:
            adapted = strategy.adapt(inner.with_steps(k), model, task.support_x, task.support_y).model
            net = maml.network(adapted, max(k - 1, 0))
            outs.append((metric(net, task.query_x, task.query_y), inner.loss_fn(net, task.query_x, task.query_y)))
        return jnp.stack([m for m, _ in outs]), jnp.stack([l for _, l in outs]), before

    return over(one, tasks)


_measure = eqx.filter_jit(adapt_and_measure)


def evaluate_tasks(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy,
                   steps: Sequence[int], metric: Callable, over: Callable = jax.lax.map) -> TaskResults:
    """`adapt_and_measure` on a batch of tasks, as NumPy arrays."""
    m, loss, before = _measure(model, tasks, inner, strategy, tuple(steps), metric, over)
    return TaskResults(np.asarray(m), np.asarray(loss), np.asarray(before), tuple(steps))


def _blocks(images, episodes: Episodes, key: jax.Array, num_tasks: int):
    """The sampler of `num_tasks` episodes drawn in blocks, and the key of each block."""
    block = min(BLOCK, num_tasks)
    return episodes.sampler(images, block), [jax.random.fold_in(key, b) for b in
                                                       range(math.ceil(num_tasks / block))]


def evaluate_episodes(model, images, episodes: Episodes, key: jax.Array, num_tasks: int, inner: maml.InnerLoop,
                      strategy: maml.AbstractStrategy, steps: Sequence[int]) -> TaskResults:
    """Query accuracy (and loss) of `num_tasks` episodes drawn from the class-major `images` (the draw depends
    only on `key` and the count), in blocks of `BLOCK` tasks."""
    sampler, keys = _blocks(images, episodes, key, num_tasks)
    parts = [evaluate_tasks(model, draw(sampler, k), inner, strategy, steps, maml.nn.accuracy) for k in keys]
    return TaskResults(*(np.concatenate([getattr(p, f) for p in parts])[:num_tasks]
                         for f in ("metric", "loss", "before")), tuple(steps))


def episodes_at(images, episodes: Episodes, key: jax.Array, num_tasks: int, indices: np.ndarray) -> maml.Task:
    """Tasks `indices` of the `num_tasks` episodes `evaluate_episodes` draws with `key` (drawn again)."""
    sampler, keys = _blocks(images, episodes, key, num_tasks)
    block = sampler.num_tasks
    parts = [jax.tree.map(lambda a: a[indices[indices // block == b] % block], draw(sampler, keys[b]))
             for b in sorted(set((indices // block).tolist()))]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def divergences(name: str, algorithm, model, inner: maml.InnerLoop, results: TaskResults,
                tasks_at: Callable[[np.ndarray], maml.Task], key: jax.Array, most: int = 16) -> tuple[dict, list[str]]:
    """What results.json and the console say beyond the means: which rates extra steps reuse
    (`algorithm.reused_rates`), and for (at most `most` of) the diverged tasks the inner stability figure
    `algorithm.rate_bound(model) x lambda_max` (where the algorithm has one); `tasks_at(indices)` gives those
    tasks back."""
    out, notes = {}, []
    reused = algorithm.reused_rates(max(results.steps))
    if reused:
        out["reused_rates"] = reused
        notes.append(f"{name}: {reused}")
    bad = np.flatnonzero(results.bad.any(axis=1))[:most]
    figure = None
    if bad.size and algorithm.rate_bound(model) is not None:
        figure = stability(model, tasks_at(bad), inner, algorithm.rate_bound(model), key)
        out["diverged_stability"] = {"definition": "rate x lambda_max(support-loss Hessian) at the initialisation; "
                                     "above 2 the first step diverges on a quadratic model",
                                     "tasks": [int(i) for i in bad], "values": figure.tolist()}
    return out, notes + report(name, results, figure)


def report(name: str, results: TaskResults, rate_stability: Optional[np.ndarray] = None) -> list[str]:
    """The divergences of `results` in words, one line per step count that had any (empty if none)."""
    lines = []
    bad, n = results.bad, results.bad.shape[0]
    for j, k in enumerate(results.steps):
        count = int(bad[:, j].sum())
        if count:
            line = (f"{name}: after {k} step(s) {count} of {n} tasks diverged ({DIVERGED}); the figures are over "
                    f"the other {n - count}")
            if rate_stability is not None and rate_stability.size:
                line += (f"; inner stability rate x lambda_max of the diverged tasks: {np.min(rate_stability):.3g} to "
                         f"{np.max(rate_stability):.3g} (above 2 the first step diverges on a quadratic model)")
            lines.append(line)
    return lines
