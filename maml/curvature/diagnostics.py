"""Curvature of each task's support loss and of its meta-objective (the meta-Hessian), vmapped over a
batch of tasks, with the inner loop's stability `lr x lambda_max(support loss)`."""

from __future__ import annotations

from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from ..inner import AbstractLearnedRates, AbstractPerStepModel, InnerLoop
from ..meta import meta_loss
from ..tasks import Task, check_batch
from .eigenvalues import Largest, Smallest, check_num_iters, lanczos_ritz
from .traces import AbstractTraceEstimator, HutchPlusPlus, trace

Objective = tuple[Callable[[PyTree], Float[Array, ""]], PyTree]


def support_objective(model: PyTree, task: Task, inner: InnerLoop) -> Objective:
    """`(f, params)`: `f(params)` is `inner.loss_fn` on one task's support set, differentiated w.r.t. the
    leaves the inner loop adapts (`inner.adapt_filter`); the other leaves are held fixed."""
    if isinstance(model, (AbstractLearnedRates, AbstractPerStepModel)):
        raise ValueError(
            f"support_objective: model is a {type(model).__name__}; expected a plain network (learned inner "
            "rates and per-step models are not supported by the support-loss diagnostics yet)"
        )
    params, frozen = eqx.partition(model, inner.adapt_filter)
    return (lambda p: inner.loss_fn(eqx.combine(p, frozen), task.support_x, task.support_y)), params


def meta_objective(model: PyTree, task: Task, inner: InnerLoop) -> Objective:
    """`(f, params)`: `f(params)` is the exact (second-order) MAML objective of one task, the query loss
    after `inner.steps` SGD steps on the support set, w.r.t. every inexact array of `model`. Its
    Hessian is the meta-Hessian (differentiated through the inner loop's `lax.scan`)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return (lambda p: meta_loss(eqx.combine(p, static), task, inner)), params


class TaskCurvature(eqx.Module):
    """Per-task curvature; with a batch of B tasks every field has a leading axis B.

    `*_top [k]`: largest eigenvalues (decreasing) and `*_residual [k]` their Ritz bounds; `*_min`: the
    smallest eigenvalue (negative curvature); `*_trace`, `*_trace_stderr`: Hutch++ trace; `*_loss`: the
    value. `inner_stability = inner.lr x support_top[0]`: above 2 the first inner SGD step diverges
    along the top eigenvector (a quadratic model of the support loss)."""

    support_loss: Float[Array, ""]
    support_top: Float[Array, " k"]
    support_residual: Float[Array, " k"]
    support_min: Float[Array, ""]
    support_trace: Float[Array, ""]
    support_trace_stderr: Float[Array, ""]
    meta_loss: Float[Array, ""]
    meta_top: Float[Array, " k"]
    meta_residual: Float[Array, " k"]
    meta_min: Float[Array, ""]
    meta_trace: Float[Array, ""]
    meta_trace_stderr: Float[Array, ""]
    inner_stability: Float[Array, ""]

    def metrics(self) -> dict[str, Array]:
        """Scalars for a logger (means over tasks; the worst task's stability); `*_trace_stderr`: the standard
        error of the mean trace from the probes, `sqrt(sum stderr^2) / B`."""
        mean_se = lambda se: jnp.sqrt(jnp.sum(se**2)) / se.size
        return {
            "curv/support_top": jnp.mean(self.support_top[..., 0]),
            "curv/support_trace": jnp.mean(self.support_trace),
            "curv/support_trace_stderr": mean_se(self.support_trace_stderr),
            "curv/support_min": jnp.mean(self.support_min),
            "curv/meta_top": jnp.mean(self.meta_top[..., 0]),
            "curv/meta_trace": jnp.mean(self.meta_trace),
            "curv/meta_trace_stderr": mean_se(self.meta_trace_stderr),
            "curv/meta_min": jnp.mean(self.meta_min),
            "curv/inner_stability_max": jnp.max(self.inner_stability),
        }


def _dimension(params: PyTree) -> int:
    return ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[0].size


def _spectrum(objective: Objective, k, num_iters, trace_method, mode, key, what):
    f, params = objective
    m = check_num_iters(num_iters, _dimension(params), k, what)
    k1, k2 = jax.random.split(key)
    theta, bounds, *_ = lanczos_ritz(f, params, key=k1, num_iters=m, mode=mode)
    top = Largest().order(theta)[:k]
    low = Smallest().order(theta)[0]
    tr = trace(f, params, key=k2, method=trace_method, mode=mode)
    return f(params), theta[top], bounds[top], theta[low], tr.value, tr.stderr


def task_curvature(
    model: PyTree,
    tasks: Task,
    inner: InnerLoop,
    *,
    key: PRNGKeyArray,
    k: int = 1,
    num_iters: Optional[int] = None,
    meta_num_iters: Optional[int] = None,
    trace_method: AbstractTraceEstimator = HutchPlusPlus(30),
    mode: AbstractHVPMode = ForwardOverReverse(),
) -> TaskCurvature:
    """Curvature of every task in the batch `tasks` (leading axis B), vmapped: one Lanczos run and one
    trace estimate each for the support loss and for the meta-objective (see `support_objective`,
    `meta_objective`). `num_iters` / `meta_num_iters`: Lanczos steps (default `min(n, max(2k+10, 30))`).
    Jit it with `eqx.filter_jit` (ints are static)."""
    b = check_batch(tasks)

    def one(task, key):
        ks, km = jax.random.split(key)
        s = _spectrum(support_objective(model, task, inner), k, num_iters, trace_method, mode, ks, "task_curvature(support)")
        q = _spectrum(meta_objective(model, task, inner), k, meta_num_iters, trace_method, mode, km, "task_curvature(meta)")
        stability = jnp.asarray(inner.lr) * s[1][0]
        return TaskCurvature(*s, *q, stability)

    return jax.vmap(one)(tasks, jax.random.split(key, b))
