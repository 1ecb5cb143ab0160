"""Curvature of a trained run: task-loss and meta-loss (meta-Hessian) spectra, per task.

    python -m experiments.curvature --checkpoint runs/sinusoid --out runs/sinusoid/curvature

Rebuilds the model from RUN_DIR/config.json, loads the newest RUN_DIR/checkpoints/ckpt_*.eqx, samples
`--tasks` held-out tasks and reports, for each task's support loss and meta-objective (query loss
after the run's inner loop): the top-k eigenvalues with Ritz bounds, the smallest eigenvalue, the
Hutch++ trace, the SLQ spectral density and its negative mass, and the inner loop's stability
`inner_lr x lambda_max(support)` (above 2 the inner SGD step diverges). Also the top-k and trace of
the batch-mean meta-objective (what meta-training descends). Writes OUT/results.json and
OUT/density.png. Sinusoid runs only for now; other run types stop with a one-line error.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import maml
from maml import curvature as C
from maml.task_curvature import meta_objective, support_objective, task_curvature
from experiments import cli


_f = cli.flag


@dataclass(frozen=True)
class CurvatureConfig:
    """Curvature diagnostics of a trained MAML run (sinusoid)."""

    checkpoint: str = _f("runs/sinusoid", "run folder holding config.json and checkpoints/")
    out: str = _f("runs/sinusoid/curvature", "output folder (results.json, density.png)")
    tasks: int = _f(16, "held-out tasks to analyse")
    k: int = _f(5, "top eigenvalues per task")
    num_iters: int = _f(40, "Lanczos steps per task and objective (one HVP each)")
    trace_hvps: int = _f(60, "Hutch++ HVPs per trace")
    density_tasks: int = _f(4, "tasks whose SLQ densities are computed")
    probes: int = _f(8, "SLQ probe vectors per density")
    slq_iters: int = _f(40, "Lanczos steps per SLQ probe")
    seed: int = _f(1234, "random seed (tasks, probes)")

    def __post_init__(self):
        cli.check_positive(self, "tasks", "k", "num_iters", "trace_hvps", "density_tasks", "probes", "slq_iters")


def load_sinusoid(run: Path, cfg: dict):
    """(model, inner loop, step, task sampler) of a sinusoid run, from config.json and the checkpoint."""
    from data.sinusoid import sample_tasks

    model = maml.MLP(1, 1, tuple(cfg["hidden"]), key=jax.random.PRNGKey(0))  # structure only
    ckpts = run / "checkpoints"
    like = maml.init_state(model, optax.adam(cfg.get("outer_lr", 1e-3)), jax.random.PRNGKey(0))
    try:
        found = maml.latest_checkpoint(ckpts, like)
        step, model = (found[0], found[1].model) if found else (None, None)
    except ValueError as e:  # another train-state layout: the model's leaves come first, read only them
        warnings.warn(f"{e}; reading only the model's leaves")
        path = maml.checkpoint.list_checkpoints(ckpts)[-1]
        step, model = int(path.stem.split("_")[1]), maml.load_checkpoint(path, like=model)
    if model is None:
        raise ValueError(f"--checkpoint {str(run)!r}: no checkpoint in {ckpts}; expected ckpt_<step>.eqx files")
    inner = maml.InnerLoop(maml.losses.mse, int(cfg["inner_steps"]), float(cfg["inner_lr"]))
    shots = int(cfg["shots"])
    queries = int(cfg.get("queries") or shots)
    return model, inner, step, lambda key, n: sample_tasks(key, n, shots, queries)[0]


def load_run(run: Path):
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"--checkpoint {str(run)!r}: no config.json; expected a run folder written by an experiment")
    cfg = json.loads(cfg_path.read_text())
    if "hidden" in cfg and "shots" in cfg and "inner_lr" in cfg:
        return "sinusoid", cfg, *load_sinusoid(run, cfg)
    raise ValueError(
        f"--checkpoint {str(run)!r}: unknown run type (config fields {sorted(cfg)[:8]}...); "
        "only sinusoid runs (experiments.sinusoid) are supported so far, Omniglot is not yet"
    )


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
            "max": a.max(0).tolist(), "per_task": a.tolist()}


@eqx.filter_jit
def _densities(model, tasks, inner, grid, key, probes, iters):
    def one(task, key):
        k1, k2 = jax.random.split(key)
        s = C.spectral_density(*support_objective(model, task, inner), key=k1, num_probes=probes,
                               num_iters=iters, grid=grid)
        q = C.spectral_density(*meta_objective(model, task, inner), key=k2, num_probes=probes,
                               num_iters=iters, grid=grid)
        return s.density, s.negative_mass, q.density, q.negative_mass

    return jax.vmap(one)(tasks, jax.random.split(key, tasks.support_x.shape[0]))


@eqx.filter_jit
def _batch_meta(model, tasks, inner, key, k, num_iters, trace_hvps):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    f = lambda p: jnp.mean(jax.vmap(lambda t: maml.meta_loss(eqx.combine(p, static), t, inner))(tasks))
    k1, k2 = jax.random.split(key)
    eig = C.top_eigenvalues(f, params, k, key=k1, num_iters=num_iters)
    tr = C.trace(f, params, key=k2, method=C.HutchPlusPlus(trace_hvps))
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = cli.parse(CurvatureConfig, argv)
    run = Path(config.checkpoint)
    kind, cfg, model, inner, step, sample = load_run(run)
    n = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    k, iters = min(config.k, n), min(config.num_iters, n)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    key_tasks, key_curv, key_dens, key_batch = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    tasks = sample(key_tasks, config.tasks)

    start = time.perf_counter()
    tc = eqx.filter_jit(task_curvature)(model, tasks, inner, key=key_curv, k=k, num_iters=iters,
                                        meta_num_iters=iters, trace_method=C.HutchPlusPlus(config.trace_hvps))
    tc = jax.tree.map(np.asarray, tc)
    lo = float(min(tc.support_min.min(), tc.meta_min.min()))
    hi = float(max(tc.support_top[:, 0].max(), tc.meta_top[:, 0].max()))
    pad = 0.05 * (hi - lo) + 1e-12
    grid = jnp.linspace(lo - pad, hi + pad, 400)
    nd = min(config.density_tasks, config.tasks)
    sub = jax.tree.map(lambda a: a[:nd], tasks)
    s_dens, s_neg, m_dens, m_neg = map(np.asarray, _densities(model, sub, inner, grid, key_dens, config.probes,
                                                            min(config.slq_iters, n)))
    b_top, b_res, b_tr, b_se = map(np.asarray, _batch_meta(model, tasks, inner, key_batch, k, iters, config.trace_hvps))
    seconds = time.perf_counter() - start

    stability = tc.inner_stability
    results = {
        "run": str(run), "run_type": kind, "checkpoint_step": step, "num_params": int(n), "num_tasks": config.tasks,
        "inner_lr": float(inner.lr), "inner_steps": inner.steps,
        "support": {"loss": _stats(tc.support_loss), "top_k": _stats(tc.support_top),
                    "ritz_residual_max": float(tc.support_residual.max()), "min": _stats(tc.support_min),
                    "trace": _stats(tc.support_trace), "trace_stderr_max": float(tc.support_trace_stderr.max()),
                    "negative_mass": _stats(s_neg)},
        "meta": {"loss": _stats(tc.meta_loss), "top_k": _stats(tc.meta_top),
                 "ritz_residual_max": float(tc.meta_residual.max()), "min": _stats(tc.meta_min),
                 "trace": _stats(tc.meta_trace), "trace_stderr_max": float(tc.meta_trace_stderr.max()),
                 "negative_mass": _stats(m_neg)},
        "inner_stability": {"definition": "inner_lr * lambda_max(support loss Hessian); > 2 diverges",
                            **_stats(stability), "fraction_above_2": float(np.mean(stability > 2))},
        "batch_meta_objective": {"top_k": b_top.tolist(), "ritz_residuals": b_res.tolist(),
                                 "trace": float(b_tr), "trace_stderr": float(b_se)},
        "density": {"grid": np.asarray(grid).tolist(), "support_mean": s_dens.mean(0).tolist(),
                    "meta_mean": m_dens.mean(0).tolist(), "tasks": nd, "probes": config.probes},
        "settings": cli.to_json(config), "seconds": seconds, "devices": [str(d) for d in jax.devices()],
    }
    plot(out / "density.png", np.asarray(grid), s_dens, m_dens,
         f"{run} step {step}: {nd} tasks, {config.probes} probes x {min(config.slq_iters, n)} Lanczos steps")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"support_top1_mean": results["support"]["top_k"]["mean"][0],
                      "meta_top1_mean": results["meta"]["top_k"]["mean"][0],
                      "inner_stability_max": results["inner_stability"]["max"], "seconds": round(seconds, 1)}))
    return results


if __name__ == "__main__":
    cli.run(main)
