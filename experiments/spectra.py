"""The computations and the figure of experiments.curvature: per-task curvature, SLQ densities and the
batch-mean meta-objective's spectrum, in compiled chunks of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from maml import curvature as C
from maml.curvature import meta_objective, support_objective, task_curvature


def stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
            "max": a.max(0).tolist(), "per_task": a.tolist()}


def chunked(fn: Callable, tasks: maml.Task, key: jax.Array, chunk: Optional[int]):
    """`fn(tasks, key)` on all tasks at once (`chunk` None), or on consecutive chunks of `chunk` tasks with
    keys `fold_in(key, first task)`, concatenated (one compiled program when `chunk` divides the count)."""
    n = tasks.support_x.shape[0]
    if chunk is None or chunk >= n:
        return jax.tree.map(np.asarray, fn(tasks, key))
    parts = [jax.tree.map(np.asarray, fn(jax.tree.map(lambda a: a[i:i + chunk], tasks), jax.random.fold_in(key, i)))
             for i in range(0, n, chunk)]
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


@eqx.filter_jit
def per_task(model, tasks, inner, key, k, num_iters, trace_hvps, mode):
    return task_curvature(model, tasks, inner, key=key, k=k, num_iters=num_iters, meta_num_iters=num_iters,
                          trace_method=C.HutchPlusPlus(trace_hvps), mode=mode)


@eqx.filter_jit
def densities(model, tasks, inner, grid, key, probes, iters, mode):
    def one(task, key):
        k1, k2 = jax.random.split(key)
        s = C.spectral_density(*support_objective(model, task, inner), key=k1, num_probes=probes,
                               num_iters=iters, grid=grid, mode=mode)
        q = C.spectral_density(*meta_objective(model, task, inner), key=k2, num_probes=probes,
                               num_iters=iters, grid=grid, mode=mode)
        return s.density, s.negative_mass, q.density, q.negative_mass

    return jax.vmap(one)(tasks, jax.random.split(key, tasks.support_x.shape[0]))


@eqx.filter_jit
def batch_meta(model, tasks, inner, key, k, num_iters, trace_hvps, mode, sequential=False):
    """Top-k and trace of the batch-mean meta-objective; `sequential`: tasks one after another (`lax.map`)
    inside each HVP instead of vmapped."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mapped = jax.lax.map if sequential else (lambda g, xs: jax.vmap(g)(xs))
    f = lambda p: jnp.mean(mapped(lambda t: maml.meta_loss(eqx.combine(p, static), t, inner), tasks))
    k1, k2 = jax.random.split(key)
    eig = C.top_eigenvalues(f, params, k, key=k1, num_iters=num_iters, mode=mode)
    tr = C.trace(f, params, key=k2, method=C.HutchPlusPlus(trace_hvps), mode=mode)
    return eig.values, eig.residuals, tr.value, tr.stderr


def plot(path: Path, grid, support, meta, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, dens, name in zip(axes, (support, meta), ("support loss (task)", "meta-objective")):
        for d in dens:
            ax.semilogy(grid, np.maximum(d, 1e-8), color="C0" if name.startswith("s") else "C1", alpha=0.3, lw=0.8)
        ax.semilogy(grid, np.maximum(dens.mean(0), 1e-8), "k-", lw=1.5, label="mean over tasks")
        ax.axvline(0.0, color="gray", lw=0.5)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_ylim(1e-6, None)
        ax.set_title(f"Hessian spectrum: {name}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


