"""The computations and the figure of experiments.curvature: per-task curvature, SLQ densities and the
batch-mean meta-objective's spectrum, in compiled chunks of tasks; the summaries results.json holds (no
NaN reaches it: a non-finite figure is None, and the summary says how many tasks gave one)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from maml import curvature as C
from maml.curvature import meta_objective, support_objective, task_curvature


def finite(a):
    """`a` (a number or an array) as JSON: a float or nested lists of floats, None where not finite."""
    a = np.asarray(a, np.float64)
    if a.ndim == 0:
        return float(a) if np.isfinite(a) else None
    return [finite(x) for x in a]


def _non_finite(bad: np.ndarray) -> dict:
    n = int(bad.sum())
    return {"non_finite": f"{n} of {bad.size} tasks gave NaN or inf (a diverged model?); the summary is over the "
                          "others"} if n else {}


def stats(a) -> dict:
    """Over the leading (task) axis of `a`: mean, std, min, max of the tasks whose figures are all finite,
    and `per_task`."""
    a = np.asarray(a, np.float64)
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    good = a[~bad]
    if not len(good):
        summary = {k: None for k in ("mean", "std", "min", "max")}
    else:
        summary = {"mean": finite(good.mean(0)), "std": finite(good.std(0)), "min": finite(good.min(0)),
                   "max": finite(good.max(0))}
    return {**summary, "per_task": finite(a), **_non_finite(bad)}


def stderrs(se) -> dict:
    """Per-task standard errors `se [B]`: `per_task`, `max`, and `of_mean` (the standard error of the mean over
    tasks from the probes alone: sqrt(sum se^2) / B; the spread over tasks is in the figure's `std`)."""
    se = np.asarray(se, np.float64)
    bad = ~np.isfinite(se)
    good = se[~bad]
    if not len(good):
        return {"per_task": finite(se), "max": None, "of_mean": None, **_non_finite(bad)}
    return {"per_task": finite(se), "max": float(good.max()), "of_mean": float(np.sqrt(np.sum(good**2)) / len(good)),
            **_non_finite(bad)}


def pm(value: Optional[float], se: Optional[float]) -> str:
    """`value ± se` for the console (`NaN` in words where a figure is missing)."""
    if value is None:
        return "NaN (non-finite)"
    return f"{value:.3g} ± {se:.2g}" if se is not None else f"{value:.3g} (no standard error)"


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
def densities(model, tasks, inner, grid, key, probes, iters, negative_cut, mode
              ) -> tuple[C.SpectralDensity, C.SpectralDensity]:
    """SLQ densities of each task's support loss and meta-objective on `grid` (every field with a leading
    task axis)."""
    def one(task, key):
        k1, k2 = jax.random.split(key)
        s, q = (C.spectral_density(*objective(model, task, inner), key=k, num_probes=probes, num_iters=iters, grid=grid,
                                   negative_cut=negative_cut, mode=mode)
                for objective, k in ((support_objective, k1), (meta_objective, k2)))
        return s, q

    return jax.vmap(one)(tasks, jax.random.split(key, tasks.support_x.shape[0]))


def mean_density(dens: C.SpectralDensity, grid) -> tuple[np.ndarray, np.ndarray]:
    """Mean over tasks of the tasks' smoothed densities at `grid [G]`, and its standard error over the probes."""
    parts = [jax.tree.map(lambda a: a[i], dens).at(jnp.asarray(grid)) for i in range(len(dens.sigma))]
    d = np.stack([np.asarray(p[0], np.float64) for p in parts])
    se = np.stack([np.asarray(p[1], np.float64) for p in parts])
    return d.mean(0), np.sqrt(np.sum(se**2, axis=0)) / len(parts)


def mass_range(dens: C.SpectralDensity, quantile: float = 0.005) -> tuple[float, float]:
    """Where the density's mass is: the `quantile` and `1 - quantile` points of the nodes weighted by their
    quadrature weights (over tasks and probes), padded by 4 sigma, with 0 inside."""
    nodes = np.asarray(dens.nodes, np.float64).ravel()
    weights = np.asarray(dens.weights, np.float64).ravel()
    ok = np.isfinite(nodes) & np.isfinite(weights)
    nodes, weights = nodes[ok], weights[ok]
    if not nodes.size:
        return -1.0, 1.0
    order = np.argsort(nodes)
    cdf = np.cumsum(weights[order]) / np.sum(weights)
    lo = nodes[order][min(np.searchsorted(cdf, quantile), nodes.size - 1)]
    hi = nodes[order][min(np.searchsorted(cdf, 1 - quantile), nodes.size - 1)]
    pad = 4 * float(np.nanmax(np.asarray(dens.sigma)))
    return min(lo - pad, -pad), max(hi + pad, pad)


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


def _mark(ax, x: float, lo: float, hi: float, label: str) -> None:
    """A dashed line at eigenvalue `x` if it lies in the axis range `[lo, hi]`, else an arrow at that edge."""
    if not math.isfinite(x):
        ax.annotate(f"{label} NaN", xy=(0.5, 0.92), xycoords="axes fraction", ha="center", fontsize=7, color="C3")
    elif lo <= x <= hi:
        ax.axvline(x, color="C3", ls="--", lw=0.8)
        ax.annotate(f"{label} {x:.3g}", xy=(x, 0.92), xycoords=("data", "axes fraction"), fontsize=7, color="C3",
                    ha="right" if x > 0 else "left")
    else:
        right = x > hi
        ax.annotate(f"{label} {x:.3g} " + ("→" if right else "←"), xy=(1.0 if right else 0.0, 0.92),
                    xycoords="axes fraction", ha="right" if right else "left", fontsize=7, color="C3")


def plot(path: Path, panels: Sequence[tuple[str, C.SpectralDensity, float, float]], negative_cut: float,
         title: str, num_points: int = 400) -> None:
    """One panel per `(name, densities of the tasks, smallest eigenvalue, largest eigenvalue)`: each task's
    smoothed density and their mean with its band of +- 2 standard errors over probes, over the range holding
    the mass (`mass_range`); the extreme eigenvalues (from Lanczos) are marked, by an arrow when outside it,
    and a dotted line at -negative_cut x sigma shows where the negative mass starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (name, dens, low, high), color in zip(axes[0], panels, ("C0", "C1")):
        lo, hi = mass_range(dens)
        grid = np.linspace(lo, hi, num_points)
        for i in range(len(dens.sigma)):
            d, _ = jax.tree.map(lambda a: a[i], dens).at(jnp.asarray(grid))
            ax.semilogy(grid, np.maximum(np.asarray(d), 1e-8), color=color, alpha=0.3, lw=0.8)
        mean, se = mean_density(dens, grid)
        ax.fill_between(grid, np.maximum(mean - 2 * se, 1e-8), np.maximum(mean + 2 * se, 1e-8), color="k", alpha=0.15,
                        lw=0, label="+- 2 standard errors (probes)")
        ax.semilogy(grid, np.maximum(mean, 1e-8), "k-", lw=1.5, label="mean over tasks")
        ax.axvline(0.0, color="gray", lw=0.5)
        cut = -negative_cut * float(np.nanmean(np.asarray(dens.sigma)))
        ax.axvline(cut, color="gray", ls=":", lw=0.8, label=f"-{negative_cut:g} sigma: negative mass to the left")
        _mark(ax, low, lo, hi, "min eig")
        _mark(ax, high, lo, hi, "max eig")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_ylim(1e-6, None)
        ax.set_title(f"Hessian spectrum: {name}")
        ax.legend(fontsize=7, loc="lower center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


