"""Curvature of a trained run: task-loss and meta-loss (meta-Hessian) spectra, per task.

    python -m experiments.curvature --checkpoint runs/sinusoid --out runs/sinusoid/curvature
    python -m experiments.curvature --checkpoint runs/omniglot --out runs/omniglot/curvature [--data-dir DIR]

Rebuilds the model from RUN_DIR/config.json, loads the newest RUN_DIR/checkpoints/ckpt_*.eqx, samples
`--tasks` held-out tasks and reports, for each task's support loss and meta-objective (query loss
after the run's inner loop, differentiated to second order whatever the run trained with): the top-k
eigenvalues with Ritz bounds, the smallest eigenvalue, the Hutch++ trace, the SLQ spectral density and
its negative mass (`maml.curvature.densities`: the density's mass below -3 sigma), and the inner loop's
stability `inner_lr x lambda_max(support)` (above 2 the inner SGD step diverges). Also the top-k and trace
of the batch-mean meta-objective (what meta-training descends). Every stochastic figure (traces, negative
masses, densities) comes with its standard error over the random probes (`*_stderr`), and the console
line shows them as `mean ± stderr`. Writes OUT/results.json (strict JSON: a non-finite figure is null and
the summary says how many tasks gave one) and OUT/density.png (over the range holding the mass, the
extreme eigenvalues marked), and logs them to wandb (`--wandb`, as every experiment: the plot as an image,
results.json as the run summary).

Run types, recognised from config.json:
- sinusoid (`experiments.sinusoid`): fresh sine tasks of the run's shots/queries; defaults 16 tasks,
  40 Lanczos steps, 60 Hutch++ HVPs, SLQ densities of 4 tasks x 4 probes x 15 steps (about 2 minutes
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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import maml
from experiments import cli, evaluation, runs, spectra, tracking
from experiments.config import POSITIVE, SEED, Checked, FlagError, at_least, flag, section
from experiments.config_tree import to_flat

# Defaults of the cost settings per run type (a flag given on the command line wins). probes x slq_iters: the
# smallest whose SLQ negative mass was within 0.05 of the dense figure on every task and probe draw of the tiny
# models of the tests (sinusoid MLPs; a 525-parameter Conv4), support loss and meta-objective alike
# (benchmarks/RESULTS.md, section 4; python -m benchmarks.curvature --accuracy).
DEFAULTS = {
    "sinusoid": dict(tasks=16, num_iters=40, trace_hvps=60, density_tasks=4, probes=4, slq_iters=15),
    "omniglot": dict(tasks=4, num_iters=20, trace_hvps=12, density_tasks=1, probes=2, slq_iters=20),
}
# How many tasks one compiled call handles: all at once (vmap) for the sinusoid MLP; one at a time for the
# Conv4, whose batched convolutions are several times slower per task on CPU (../shared/notes).
CHUNK = {"sinusoid": None, "omniglot": 1}
# HVP mode: for the Conv4 on CPU, reverse-over-reverse is about 3x faster than forward-over-reverse on the
# meta-objective (1.6 s vs 4.4 s per HVP at 64 filters on a loaded 2-core machine), 2x on the support loss.
MODE = {"sinusoid": maml.ForwardOverReverse(), "omniglot": maml.ReverseOverReverse()}
NEGATIVE_CUT = 3.0  # the negative mass is the density's mass below -NEGATIVE_CUT x sigma (maml.curvature.densities)
NEGATIVE_MASS = (f"fraction of the SLQ density (each Ritz node a Gaussian of width sigma = 0.01 x the span of the nodes) "
                 f"below -{NEGATIVE_CUT:g} sigma: each eigenvalue lam counts Phi(-(lam + {NEGATIVE_CUT:g} sigma) / sigma), "
                 f"so a null space counts {50 * math.erfc(NEGATIVE_CUT / math.sqrt(2)):.2g}% of itself")
STDERR = ("*_stderr: standard errors over the random probes (Hutch++: of its Hutchinson part; SLQ: of the per-probe "
          "estimates), per task, their max, and of_mean: of the mean over tasks; the spread over tasks is each figure's std")
ALGORITHMS = ("maml", "fomaml")  # runs whose meta-objective is the plain MAML one of their inner loop
EXPECTED = "a run folder of experiments.sinusoid or experiments.omniglot"


def _per_type(name: str) -> str:
    return "default: " + ", ".join(f"{v[name]} for {k}" for k, v in DEFAULTS.items()) + " runs"


@dataclass(frozen=True)
class Budget(Checked):
    """What is computed, and how many HVPs it costs."""

    tasks: Optional[int] = flag(None, "held-out tasks to analyse (" + _per_type("tasks") + ")", rule=POSITIVE)
    k: int = flag(5, "top eigenvalues per task", rule=POSITIVE)
    num_iters: Optional[int] = flag(None, "Lanczos steps per task and objective, one HVP each ("
                                    + _per_type("num_iters") + ")", rule=POSITIVE)
    trace_hvps: Optional[int] = flag(None, "Hutch++ HVPs per trace (" + _per_type("trace_hvps") + ")", rule=POSITIVE)
    density_tasks: Optional[int] = flag(None, "tasks whose SLQ densities are computed, 0: none ("
                                        + _per_type("density_tasks") + ")", rule=at_least(0, " (0: no densities)"))
    probes: Optional[int] = flag(None, "SLQ probe vectors per density, at least 2 for a standard error ("
                                 + _per_type("probes") + ")", rule=at_least(2, " (a standard error needs two probes)"))
    slq_iters: Optional[int] = flag(None, "Lanczos steps per SLQ probe (" + _per_type("slq_iters") + ")",
                                    rule=POSITIVE)
    seed: int = flag(1234, "random seed (tasks, probes)", rule=SEED)
    batch_meta: bool = flag(True, "also the top-k and trace of the batch-mean meta-objective (on Conv4 its HVP "
                                  "program is about a third of the compile time; --no-batch-meta skips it)")

    def resolved(self, kind: str) -> "Budget":
        """This budget with the unset settings filled in with `kind`'s defaults."""
        return dataclasses.replace(self, **{k: v for k, v in DEFAULTS[kind].items() if getattr(self, k) is None})


@dataclass(frozen=True)
class CurvatureConfig:
    """Curvature diagnostics of a trained MAML run (sinusoid or Omniglot)."""

    checkpoint: str = flag("runs/sinusoid", "run folder holding config.json and checkpoints/")
    out: str = flag("runs/sinusoid/curvature", "output folder (results.json, density.png)")
    data_dir: Optional[str] = flag(None, "Omniglot runs: folder of the Omniglot zips (default: the run's data_dir)")
    budget: Budget = section(Budget)
    tracking: tracking.TrackingConfig = section(tracking.TrackingConfig)


@dataclass(frozen=True)
class Loaded:
    """What the diagnostics need from a trained run."""

    kind: str
    model: eqx.Module
    inner: maml.InnerLoop
    step: int
    sample: Callable[[jax.Array, int], maml.Task]  # (key, n) -> n held-out tasks
    info: dict = dataclasses.field(default_factory=dict)  # extra results entries of this run type


def held_out_tasks(run: runs.Run) -> tuple[Callable[[jax.Array, int], maml.Task], dict]:
    """`(key, n) -> n` held-out tasks of the run's setting, and what results.json says about them:
    fresh sine tasks of the run's shots / queries, or episodes of the run's meta-test alphabets."""
    if run.kind == "sinusoid":
        from data.sinusoid import sample_tasks

        shots = run.config.tasks.shots
        queries = run.config.tasks.queries or shots
        return (lambda key, n: sample_tasks(key, n, shots, queries)[0]), {}
    splits = run.module.load_splits(run.config.data)
    episodes = run.config.data.episodes

    def sample(key: jax.Array, n: int) -> maml.Task:
        return evaluation.draw(episodes.sampler(splits.test, n), key)

    info = {"episodes": {**episodes._asdict(), "split": "meta-test", splits.names_key: list(splits.test_names),
                         splits.counts_key: int(len(splits.test)), "data_dir": str(run.config.data.data_dir)}}
    return sample, info


def load(run_dir: Path, data_dir: Optional[str]) -> Loaded:
    """The run in `run_dir` (a maml or fomaml run; `data_dir` overrides an Omniglot run's)."""
    kind, flat = runs.read(run_dir, expected=EXPECTED)
    if kind == "sinusoid" and data_dir is not None:
        raise FlagError("--data-dir", f"--data-dir is for Omniglot runs; --checkpoint {str(run_dir)!r} is a sinusoid run")
    algorithm = flat.get("algorithm", "maml")
    if algorithm not in ALGORITHMS:
        raise FlagError("--checkpoint", f"--checkpoint {str(run_dir)!r} is a run of --algorithm {algorithm}; the "
                                        f"curvature diagnostics support {' and '.join(ALGORITHMS)} runs only")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FlagError("--data-dir", f"--data-dir {data_dir!r} is not a folder; expected the folder holding the "
                                      "Omniglot zips")
    if kind == "omniglot" and data_dir is None and not Path(flat.get("data_dir") or "").is_dir():
        raise FlagError("--checkpoint", f"--checkpoint {str(run_dir)!r}: the run's data_dir {flat.get('data_dir')!r} is "
                                        "not a folder; pass --data-dir DIR (the folder holding the Omniglot zips)")
    run = runs.load(run_dir, expected=EXPECTED, overrides={"data_dir": data_dir} if data_dir else None)
    sample, info = held_out_tasks(run)
    info = {**info, "algorithm": algorithm, **({"hvp_mode": type(MODE[kind]).__name__} if kind == "omniglot" else {})}
    return Loaded(kind, run.state.model, run.algo.inner, run.step, sample, info)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(CurvatureConfig, argv))
    run = Path(config.checkpoint)
    loaded = load(run, config.data_dir)
    config = dataclasses.replace(config, budget=config.budget.resolved(loaded.kind))
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FlagError("--out", f"--out {config.out!r} is a file; expected a directory (existing or to be created)")
    out.mkdir(parents=True, exist_ok=True)
    logger = tracking.start(config.tracking, to_flat(config), out, job="curvature")
    with logger:  # a crash finishes the wandb run as failed
        results = {**diagnose(config.budget, loaded, run, out), "settings": to_flat(config)}
        maml.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, allow_nan=False).encode())
        print(json.dumps(console(results), ensure_ascii=False))
        # Not named "density" (the file's stem): the image would land on results' "density" in the summary.
        if "density" in results:
            logger.log_image("spectral_density", out / "density.png", loaded.step or 0)
        tracking.finish(logger, results, step=loaded.step or 0)
    return results


def console(results: dict) -> dict:
    """The console line: top eigenvalues, the inner stability, and every stochastic figure as `mean ± stderr`
    (means over tasks; the standard error of the mean from the probes)."""
    line = {"support_top1_mean": results["support"]["top_k"]["mean"][0] if results["support"]["top_k"]["mean"] else None,
            "meta_top1_mean": results["meta"]["top_k"]["mean"][0] if results["meta"]["top_k"]["mean"] else None,
            "inner_stability_max": results["inner_stability"]["max"]}
    for part in ("support", "meta"):
        for name in ("trace", "negative_mass"):
            if name in results[part]:
                line[f"{part}_{name}"] = spectra.pm(results[part][name]["mean"], results[part][f"{name}_stderr"]["of_mean"])
    if "batch_meta_objective" in results:
        batch = results["batch_meta_objective"]
        line["batch_meta_trace"] = spectra.pm(batch["trace"], batch["trace_stderr"])
    return {**line, "seconds": round(results["seconds"], 1)}


def diagnose(budget: Budget, loaded: Loaded, run: Path, out: Path) -> dict:
    """Every figure of results.json (and density.png), from the run's model on held-out tasks."""
    kind, model, inner, step, sample = loaded.kind, loaded.model, loaded.inner, loaded.step, loaded.sample
    chunk, mode = CHUNK[kind], MODE[kind]
    n = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    k, iters = min(budget.k, n), min(budget.num_iters, n)
    key_tasks, key_curv, key_dens, key_batch = jax.random.split(jax.random.PRNGKey(budget.seed), 4)
    tasks = sample(key_tasks, budget.tasks)

    start = time.perf_counter()
    tc = spectra.chunked(lambda t, key: spectra.per_task(model, t, inner, key, k, iters, budget.trace_hvps, mode), tasks, key_curv,
                  chunk)
    lo = float(min(tc.support_min.min(), tc.meta_min.min()))
    hi = float(max(tc.support_top[:, 0].max(), tc.meta_top[:, 0].max()))
    pad = 0.05 * (hi - lo) + 1e-12
    grid = jnp.linspace(lo - pad, hi + pad, 400)
    nd = min(budget.density_tasks, budget.tasks)
    sub = jax.tree.map(lambda a: a[:nd], tasks)
    slq_iters = min(budget.slq_iters, n)
    dens = {}
    if nd:
        dens["support"], dens["meta"] = spectra.chunked(
            lambda t, key: spectra.densities(model, t, inner, grid, key, budget.probes, slq_iters, NEGATIVE_CUT, mode), sub,
            key_dens, chunk)
    batch = None
    if budget.batch_meta:
        b_top, b_res, b_tr, b_se = map(np.asarray, spectra.batch_meta(model, tasks, inner, key_batch, k, iters,
                                                               budget.trace_hvps, mode, sequential=chunk is not None))
        batch = {"top_k": spectra.finite(b_top), "ritz_residuals": spectra.finite(b_res), "trace": spectra.finite(b_tr),
                 "trace_stderr": spectra.finite(b_se)}
    seconds = time.perf_counter() - start

    def part(name: str) -> dict:
        field = lambda f: getattr(tc, f"{name}_{f}")
        out = {"loss": spectra.stats(field("loss")), "top_k": spectra.stats(field("top")),
               "ritz_residual_max": spectra.finite(np.max(field("residual"))), "min": spectra.stats(field("min")),
               "trace": spectra.stats(field("trace")), "trace_stderr": spectra.stderrs(field("trace_stderr"))}
        if nd:
            out["negative_mass"] = spectra.stats(dens[name].negative_mass)
            out["negative_mass_stderr"] = spectra.stderrs(dens[name].negative_mass_stderr)
        return out

    stability = tc.inner_stability
    results = {
        "run": str(run), "run_type": kind, "checkpoint_step": step, "num_params": int(n), "num_tasks": budget.tasks,
        "inner_lr": float(inner.lr), "inner_steps": inner.steps,
        **loaded.info,
        "support": part("support"),
        "meta": part("meta"),
        "inner_stability": {"definition": "inner_lr * lambda_max(support loss Hessian); > 2 diverges",
                            **spectra.stats(stability), "fraction_above_2": float(np.mean(stability > 2))},
        **({"batch_meta_objective": batch} if batch is not None else {}),  # (not with --no-batch-meta)
        "stderr_definition": STDERR,
        **({"density": density_results(dens, grid, nd, budget.probes, slq_iters)} if nd else {}),
        "seconds": seconds, "devices": [str(d) for d in jax.devices()],
    }
    if nd:
        panels = [("support loss (task)", dens["support"], float(np.min(tc.support_min[:nd])), float(np.max(tc.support_top[:nd, 0]))),
                  ("meta-objective", dens["meta"], float(np.min(tc.meta_min[:nd])), float(np.max(tc.meta_top[:nd, 0])))]
        spectra.plot(out / "density.png", panels, NEGATIVE_CUT,
                     f"{run} step {step}: {nd} task{'s' if nd > 1 else ''}, {budget.probes} probes x {slq_iters} Lanczos steps")
    return results


def density_results(dens: dict, grid, nd: int, probes: int, steps: int) -> dict:
    """results.json's `density`: the mean over tasks of each objective's density on the common `grid`, its
    standard error over probes, the smoothing widths, and what the negative mass is."""
    out = {"grid": spectra.finite(grid), "tasks": nd, "probes": probes, "lanczos_steps": steps,
           "negative_mass_definition": NEGATIVE_MASS}
    for name, d in dens.items():
        mean, se = spectra.mean_density(d, grid)
        out[f"{name}_mean"], out[f"{name}_stderr"] = spectra.finite(mean), spectra.finite(se)
        out[f"{name}_sigma"] = spectra.finite(d.sigma)
    return out


if __name__ == "__main__":
    cli.run(main)
