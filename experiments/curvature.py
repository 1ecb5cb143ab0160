"""Curvature of a trained run: task-loss and meta-loss (meta-Hessian) spectra, per task.

    python -m experiments.curvature --checkpoint runs/sinusoid --out runs/sinusoid/curvature
    python -m experiments.curvature --checkpoint runs/omniglot --out runs/omniglot/curvature [--data-dir DIR]

Rebuilds the model from RUN_DIR/config.json, loads the newest RUN_DIR/checkpoints/ckpt_*.eqx, samples
`--tasks` held-out tasks and reports, for each task's support loss and meta-objective (query loss
after the run's inner loop, differentiated to second order whatever the run trained with): the top-k
eigenvalues with Ritz bounds, the smallest eigenvalue, the Hutch++ trace, the SLQ spectral density and
its negative mass, and the inner loop's stability `inner_lr x lambda_max(support)` (above 2 the inner
SGD step diverges). Also the top-k and trace of the batch-mean meta-objective (what meta-training
descends). Writes OUT/results.json and OUT/density.png, and logs them to wandb (`--wandb`, as every
experiment: the plot as an image, results.json as the run summary).

Run types, recognised from config.json:
- sinusoid (`experiments.sinusoid`): fresh sine tasks of the run's shots/queries; defaults 16 tasks,
  40 Lanczos steps, 60 Hutch++ HVPs, SLQ densities of 4 tasks x 8 probes x 40 steps (about 2 minutes
  on 2 busy CPU cores, mostly compilation).
- Omniglot (`experiments.omniglot`): N-way K-shot episodes (the run's ways, shots, queries) from the
  run's meta-test alphabets, read from the run's `data_dir` (or `--data-dir`), and the run's training
  inner loop (`inner_steps`, `inner_lr`, built from its config). The Conv4 (~113k parameters at 64
  filters) makes HVPs costly, so the defaults are smaller: 4 tasks, 20 Lanczos steps, 12 Hutch++ HVPs,
  SLQ densities of 1 task x 2 probes x 20 steps; tasks are processed one at a time (batched convolutions
  are slower per task on CPU) with reverse-over-reverse HVPs (about 3x faster than forward-over-reverse
  here). At 64 filters this took 10 minutes on 2 busy CPU cores (load 4-7), about 8 of them compiling the
  HVP programs; each further task costs about 10 s. Only runs of `--algorithm maml` or `fomaml` are
  supported; other algorithms stop with a one-line error.
Any other config.json stops with a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import maml
from maml import curvature as C
from maml.curvature import meta_objective, support_objective, task_curvature
from experiments import cli, tracking


_f = cli.flag

# Defaults of the cost settings per run type (a flag given on the command line wins).
DEFAULTS = {
    "sinusoid": dict(tasks=16, num_iters=40, trace_hvps=60, density_tasks=4, probes=8, slq_iters=40),
    "omniglot": dict(tasks=4, num_iters=20, trace_hvps=12, density_tasks=1, probes=2, slq_iters=20),
}
# How many tasks one compiled call handles: all at once (vmap) for the sinusoid MLP; one at a time for the
# Conv4, whose batched convolutions are several times slower per task on CPU (../shared/notes).
CHUNK = {"sinusoid": None, "omniglot": 1}
# HVP mode: for the Conv4 on CPU, reverse-over-reverse is about 3x faster than forward-over-reverse on the
# meta-objective (1.6 s vs 4.4 s per HVP at 64 filters on a loaded 2-core machine), 2x on the support loss.
MODE = {"sinusoid": maml.ForwardOverReverse(), "omniglot": maml.ReverseOverReverse()}
ALGORITHMS = ("maml", "fomaml")  # runs whose meta-objective is the plain MAML one of their inner loop


def _per_type(name: str) -> str:
    return "default: " + ", ".join(f"{v[name]} for {k}" for k, v in DEFAULTS.items()) + " runs"


@dataclass(frozen=True)
class CurvatureConfig(tracking.Tracking):
    """Curvature diagnostics of a trained MAML run (sinusoid or Omniglot)."""

    checkpoint: str = _f("runs/sinusoid", "run folder holding config.json and checkpoints/")
    out: str = _f("runs/sinusoid/curvature", "output folder (results.json, density.png)")
    data_dir: Optional[str] = _f(None, "Omniglot runs: folder of the Omniglot zips (default: the run's data_dir)")
    tasks: Optional[int] = _f(None, "held-out tasks to analyse (" + _per_type("tasks") + ")")
    k: int = _f(5, "top eigenvalues per task")
    num_iters: Optional[int] = _f(None, "Lanczos steps per task and objective, one HVP each (" + _per_type("num_iters") + ")")
    trace_hvps: Optional[int] = _f(None, "Hutch++ HVPs per trace (" + _per_type("trace_hvps") + ")")
    density_tasks: Optional[int] = _f(None, "tasks whose SLQ densities are computed, 0: none (" + _per_type("density_tasks") + ")")
    probes: Optional[int] = _f(None, "SLQ probe vectors per density (" + _per_type("probes") + ")")
    slq_iters: Optional[int] = _f(None, "Lanczos steps per SLQ probe (" + _per_type("slq_iters") + ")")
    seed: int = _f(1234, "random seed (tasks, probes)")
    batch_meta: bool = _f(True, "also the top-k and trace of the batch-mean meta-objective (on Conv4 its HVP "
                                "program is about a third of the compile time; --no-batch-meta skips it)")

    def __post_init__(self):
        cli.check_positive(self, "tasks", "k", "num_iters", "trace_hvps", "probes", "slq_iters")
        if self.density_tasks is not None and (not isinstance(self.density_tasks, int) or self.density_tasks < 0):
            raise ValueError(f"--density-tasks={self.density_tasks!r}; expected an integer >= 0 (0: no densities)")

    def resolved(self, kind: str) -> "CurvatureConfig":
        """This config with the unset cost settings filled in with `kind`'s defaults."""
        return dataclasses.replace(self, **{k: v for k, v in DEFAULTS[kind].items() if getattr(self, k) is None})


@dataclass(frozen=True)
class Run:
    """What the diagnostics need from a trained run."""

    kind: str
    config: dict  # the run's config.json
    model: eqx.Module
    inner: maml.InnerLoop
    step: Optional[int]  # meta-iteration of the checkpoint
    sample: Callable[[jax.Array, int], maml.Task]  # (key, n) -> n held-out tasks
    info: dict = dataclasses.field(default_factory=dict)  # extra results entries of this run type


def load_sinusoid(run: Path, cfg: dict):
    """(model, inner loop, step, task sampler) of a sinusoid run, from config.json and the checkpoint."""
    from data.sinusoid import sample_tasks

    model = maml.nn.MLP(1, 1, tuple(cfg["hidden"]), key=jax.random.PRNGKey(0))  # structure only
    ckpts = run / "checkpoints"
    like = maml.init_state(model, optax.adam(cfg.get("outer_lr", 1e-3)), jax.random.PRNGKey(0))
    try:
        found = maml.latest_checkpoint(ckpts, like)
        step, model = (found[0], found[1].model) if found else (None, None)
    except ValueError as e:  # another train-state layout: the model's leaves come first, read only them
        warnings.warn(f"{e}; reading only the model's leaves")
        path = maml.list_checkpoints(ckpts)[-1]
        step, model = int(path.stem.split("_")[1]), maml.load_checkpoint(path, like=model)
    if model is None:
        raise ValueError(f"--checkpoint {str(run)!r}: no checkpoint in {ckpts}; expected ckpt_<step>.eqx files")
    inner = maml.InnerLoop(maml.nn.mse, int(cfg["inner_steps"]), float(cfg["inner_lr"]))
    shots = int(cfg["shots"])
    queries = int(cfg.get("queries") or shots)
    return model, inner, step, lambda key, n: sample_tasks(key, n, shots, queries)[0]


_draw = eqx.filter_jit(lambda sampler, key: sampler(key))  # the sampler (with its images) is an argument


def load_omniglot_run(run: Path, cfg: dict, data_dir: Optional[str]) -> Run:
    """An `experiments.omniglot` run: its Conv4 at the newest checkpoint, its training inner loop, and
    episodes from its meta-test alphabets (built by experiments.omniglot's own functions)."""
    from data.episodes import episode_sampler
    from data.omniglot import load_omniglot
    from experiments import lake_oneshot, omniglot

    algorithm = cfg.get("algorithm", "maml")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"--checkpoint {str(run)!r} is a run of --algorithm {algorithm}; the curvature "
                         f"diagnostics support {' and '.join(ALGORITHMS)} runs only")
    run_config = lake_oneshot.load_run_config(run)  # the run's OmniglotConfig; unknown keys are ignored
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise ValueError(f"--data-dir {data_dir!r} is not a folder; expected the folder holding the Omniglot zips")
        run_config = dataclasses.replace(run_config, data_dir=data_dir)
    elif not Path(run_config.data_dir).is_dir():
        raise ValueError(f"--checkpoint {str(run)!r}: the run's data_dir {run_config.data_dir!r} is not a folder; "
                         "pass --data-dir DIR (the folder holding the Omniglot zips)")
    model, step = lake_oneshot.load_model(run, run_config)
    inner = omniglot.make_inner(run_config, run_config.inner_steps)
    cache = Path(run_config.cache_dir) if run_config.cache_dir else omniglot.DEFAULT_CACHE
    data = load_omniglot(run_config.data_dir, cache, download=False)
    _, _, test_images, test_names = omniglot.split_data(run_config, data)
    ways, shots, queries = run_config.ways, run_config.shots, run_config.queries

    def sample(key: jax.Array, n: int) -> maml.Task:
        try:
            sampler = episode_sampler(test_images, ways, shots, queries, n)
        except ValueError as e:
            raise ValueError(f"meta-test alphabets: {e}") from None
        return _draw(sampler, key)

    info = {"episodes": {"ways": ways, "shots": shots, "queries": queries, "split": "meta-test",
                         "test_alphabets": list(test_names), "characters": int(len(test_images)),
                         "data_dir": str(run_config.data_dir)},
            "algorithm": algorithm, "hvp_mode": type(MODE["omniglot"]).__name__}
    return Run("omniglot", cfg, model, inner, step, sample, info)


def run_type(cfg: dict) -> Optional[str]:
    if all(k in cfg for k in ("hidden", "shots", "inner_lr")):
        return "sinusoid"
    if all(k in cfg for k in ("data_dir", "ways", "shots", "filters", "inner_lr")):
        return "omniglot"
    return None


def load_run(run: Path, data_dir: Optional[str] = None) -> Run:
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"--checkpoint {str(run)!r}: no config.json; expected a run folder written by an experiment")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--checkpoint: {cfg_path} is not valid JSON ({e})") from None
    kind = run_type(cfg) if isinstance(cfg, dict) else None
    if kind == "sinusoid":
        if data_dir is not None:
            raise ValueError(f"--data-dir is for Omniglot runs; --checkpoint {str(run)!r} is a sinusoid run")
        return Run(kind, cfg, *load_sinusoid(run, cfg))
    if kind == "omniglot":
        return load_omniglot_run(run, cfg, data_dir)
    fields = sorted(cfg)[:8] if isinstance(cfg, dict) else type(cfg).__name__
    raise ValueError(
        f"--checkpoint {str(run)!r}: unknown run type (config fields {fields}...); expected a run folder of "
        "experiments.sinusoid or experiments.omniglot"
    )


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
            "max": a.max(0).tolist(), "per_task": a.tolist()}


def _chunked(fn: Callable, tasks: maml.Task, key: jax.Array, chunk: Optional[int]):
    """`fn(tasks, key)` on all tasks at once (`chunk` None), or on consecutive chunks of `chunk` tasks with
    keys `fold_in(key, first task)`, concatenated (one compiled program when `chunk` divides the count)."""
    n = tasks.support_x.shape[0]
    if chunk is None or chunk >= n:
        return jax.tree.map(np.asarray, fn(tasks, key))
    parts = [jax.tree.map(np.asarray, fn(jax.tree.map(lambda a: a[i:i + chunk], tasks), jax.random.fold_in(key, i)))
             for i in range(0, n, chunk)]
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


@eqx.filter_jit
def _task_curvature(model, tasks, inner, key, k, num_iters, trace_hvps, mode):
    return task_curvature(model, tasks, inner, key=key, k=k, num_iters=num_iters, meta_num_iters=num_iters,
                          trace_method=C.HutchPlusPlus(trace_hvps), mode=mode)


@eqx.filter_jit
def _densities(model, tasks, inner, grid, key, probes, iters, mode):
    def one(task, key):
        k1, k2 = jax.random.split(key)
        s = C.spectral_density(*support_objective(model, task, inner), key=k1, num_probes=probes,
                               num_iters=iters, grid=grid, mode=mode)
        q = C.spectral_density(*meta_objective(model, task, inner), key=k2, num_probes=probes,
                               num_iters=iters, grid=grid, mode=mode)
        return s.density, s.negative_mass, q.density, q.negative_mass

    return jax.vmap(one)(tasks, jax.random.split(key, tasks.support_x.shape[0]))


@eqx.filter_jit
def _batch_meta(model, tasks, inner, key, k, num_iters, trace_hvps, mode, sequential=False):
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(CurvatureConfig, argv))
    run = Path(config.checkpoint)
    loaded = load_run(run, config.data_dir)
    config = config.resolved(loaded.kind)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {config.out!r} is a file; expected a directory (existing or to be created)")
    out.mkdir(parents=True, exist_ok=True)
    logger = tracking.start(config, out, job="curvature")
    with logger:  # a crash finishes the wandb run as failed
        results = _diagnose(config, loaded, run, out)
        # Not named "density" (the file's stem): the image would land on results' "density" in the summary.
        if "density" in results:
            logger.log_image("spectral_density", out / "density.png", loaded.step or 0)
        tracking.finish(logger, results, step=loaded.step or 0)
    return results


def _diagnose(config: CurvatureConfig, loaded: Run, run: Path, out: Path) -> dict:
    kind, model, inner, step, sample = loaded.kind, loaded.model, loaded.inner, loaded.step, loaded.sample
    chunk, mode = CHUNK[kind], MODE[kind]
    n = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    k, iters = min(config.k, n), min(config.num_iters, n)
    key_tasks, key_curv, key_dens, key_batch = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    tasks = sample(key_tasks, config.tasks)

    start = time.perf_counter()
    tc = _chunked(lambda t, key: _task_curvature(model, t, inner, key, k, iters, config.trace_hvps, mode), tasks, key_curv,
                  chunk)
    lo = float(min(tc.support_min.min(), tc.meta_min.min()))
    hi = float(max(tc.support_top[:, 0].max(), tc.meta_top[:, 0].max()))
    pad = 0.05 * (hi - lo) + 1e-12
    grid = jnp.linspace(lo - pad, hi + pad, 400)
    nd = min(config.density_tasks, config.tasks)
    sub = jax.tree.map(lambda a: a[:nd], tasks)
    slq_iters = min(config.slq_iters, n)
    if nd:
        s_dens, s_neg, m_dens, m_neg = _chunked(
            lambda t, key: _densities(model, t, inner, grid, key, config.probes, slq_iters, mode), sub, key_dens, chunk)
    batch = None
    if config.batch_meta:
        b_top, b_res, b_tr, b_se = map(np.asarray, _batch_meta(model, tasks, inner, key_batch, k, iters,
                                                               config.trace_hvps, mode, sequential=chunk is not None))
        batch = {"top_k": b_top.tolist(), "ritz_residuals": b_res.tolist(), "trace": float(b_tr),
                 "trace_stderr": float(b_se)}
    seconds = time.perf_counter() - start

    stability = tc.inner_stability
    results = {
        "run": str(run), "run_type": kind, "checkpoint_step": step, "num_params": int(n), "num_tasks": config.tasks,
        "inner_lr": float(inner.lr), "inner_steps": inner.steps,
        **loaded.info,
        "support": {"loss": _stats(tc.support_loss), "top_k": _stats(tc.support_top),
                    "ritz_residual_max": float(tc.support_residual.max()), "min": _stats(tc.support_min),
                    "trace": _stats(tc.support_trace), "trace_stderr_max": float(tc.support_trace_stderr.max()),
                    **({"negative_mass": _stats(s_neg)} if nd else {})},
        "meta": {"loss": _stats(tc.meta_loss), "top_k": _stats(tc.meta_top),
                 "ritz_residual_max": float(tc.meta_residual.max()), "min": _stats(tc.meta_min),
                 "trace": _stats(tc.meta_trace), "trace_stderr_max": float(tc.meta_trace_stderr.max()),
                 **({"negative_mass": _stats(m_neg)} if nd else {})},
        "inner_stability": {"definition": "inner_lr * lambda_max(support loss Hessian); > 2 diverges",
                            **_stats(stability), "fraction_above_2": float(np.mean(stability > 2))},
        **({"batch_meta_objective": batch} if batch is not None else {}),  # (not with --no-batch-meta)
        **({"density": {"grid": np.asarray(grid).tolist(), "support_mean": s_dens.mean(0).tolist(),
                        "meta_mean": m_dens.mean(0).tolist(), "tasks": nd, "probes": config.probes}} if nd else {}),
        "settings": cli.to_json(config), "seconds": seconds, "devices": [str(d) for d in jax.devices()],
    }
    if nd:
        plot(out / "density.png", np.asarray(grid), s_dens, m_dens,
             f"{run} step {step}: {nd} tasks, {config.probes} probes x {slq_iters} Lanczos steps")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"support_top1_mean": results["support"]["top_k"]["mean"][0],
                      "meta_top1_mean": results["meta"]["top_k"]["mean"][0],
                      "inner_stability_max": results["inner_stability"]["max"], "seconds": round(seconds, 1)}))
    return results


if __name__ == "__main__":
    cli.run(main)
