"""Sinusoid regression with MAML (Finn et al. 2017, section 5.1): the project's main job.

    python -m experiments.sinusoid [--shots 5] [--iterations 70000] [--out runs/sinusoid]

Meta-trains an MLP 1-40-40-1 (ReLU) with one inner SGD step (lr 0.01) on K-shot sine tasks, meta-batch
25, Adam 1e-3, 70,000 meta-iterations; then evaluates on 1,000 held-out tasks the MSE after 0, 1, 5 and
10 inner steps, against the paper's baseline (a model pretrained on all tasks, fine-tuned the same way).
Writes OUT/results.json and OUT/fits.png. Re-running the same command resumes from OUT/checkpoints.
Expected with --shots 5: MSE below the paper's 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml
from data.sinusoid import SinusoidTasks, X_RANGE, sample_tasks, sine
from experiments import algorithms, cli, runtime, tracking


_f = cli.flag


@dataclass(frozen=True)
class SinusoidConfig(tracking.Tracking, runtime.RuntimeConfig, algorithms.AlgorithmConfig):
    """MAML sinusoid regression (Finn et al. 2017); defaults are the paper's setup."""

    shots: int = _f(10, "K: support points per task")
    queries: Optional[int] = _f(None, "query points per task in meta-training (default: same as shots)")
    inner_steps: int = _f(1, "inner SGD steps during meta-training")
    inner_lr: float = _f(0.01, "inner SGD learning rate")
    first_order: bool = _f(False, "first-order MAML (no second derivatives)")
    meta_batch: int = _f(25, "tasks per meta-iteration")
    outer_lr: float = _f(1e-3, "Adam learning rate of the meta-update")
    iterations: int = _f(70_000, "meta-iterations")
    hidden: tuple[int, ...] = _f((40, 40), "hidden layer sizes")
    seed: int = _f(0, "random seed (model init, tasks)")
    steps_per_call: int = _f(1000, "meta-iterations per compiled call (lax.scan)")
    checkpoint_every: int = _f(10_000, "checkpoint period in meta-iterations")
    baseline_iterations: int = _f(10_000, "training steps of the pretrained baseline")
    baseline_lr: float = _f(0.02, "fine-tuning SGD step of the baseline (the paper's best, 0.02)")
    eval_tasks: int = _f(1000, "held-out evaluation tasks")
    eval_points: int = _f(100, "query points per evaluation task")
    eval_steps: tuple[int, ...] = _f((0, 1, 5, 10), "inner steps at which to report the evaluation MSE")
    curvature_every: int = _f(0, "curvature diagnostics (maml.curvature.task_curvature) every N meta-iterations, logged; 0: off")
    curvature_tasks: int = _f(8, "tasks in the fixed batch the curvature diagnostics look at")
    out: str = _f("runs/sinusoid", "output folder (results.json, fits.png, checkpoints/)")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        cli.check_positive(self, "shots", "queries", "inner_lr", "meta_batch", "outer_lr", "iterations",
                           "hidden", "steps_per_call", "checkpoint_every", "baseline_iterations",
                           "baseline_lr", "eval_tasks", "eval_points", "curvature_tasks")
        if self.curvature_every < 0:
            raise ValueError(f"--curvature-every={self.curvature_every}; expected an integer >= 0 (0: off)")
        if self.inner_steps < 1:
            raise ValueError(f"--inner-steps={self.inner_steps}; expected an integer >= 1")
        if not self.eval_steps or min(self.eval_steps) < 0:
            raise ValueError(f"--eval-steps={self.eval_steps}; expected non-negative step counts")
        super().__post_init__()


# Fields that may change between a run and its resumption (they do not change training).
RESUMABLE = ("iterations", "progress", "out", "curvature_every", "curvature_tasks", "eval_tasks", "eval_points", "eval_steps", "baseline_iterations", "baseline_lr") + tracking.FIELDS + runtime.RUNTIME_FIELDS


def curvature_hook(config: SinusoidConfig, inner: maml.InnerLoop, key, logger) -> maml.Hook:
    """Every `--curvature-every` steps, log the top eigenvalue, trace and minimum eigenvalue of the support
    loss and of the meta-objective, and the inner loop's stability (lr x top eigenvalue), on a fixed batch."""
    tasks = SinusoidTasks(config.curvature_tasks, config.shots, config.queries or config.shots)(key)
    run = eqx.filter_jit(lambda model: maml.curvature.task_curvature(
        model, tasks, inner, key=key, k=1, num_iters=20, meta_num_iters=20).metrics())

    def log(info: maml.StepInfo) -> None:
        logger.log_scalars(info.step, {k: float(v) for k, v in run(maml.parallel.to_local(info.state.model)).items()})

    return maml.Hook(log, config.curvature_every, at_end=False)


def train(model, config: SinusoidConfig, inner: maml.InnerLoop, strategy, *, key, num_steps, checkpoint_dir, desc,
          hooks=(), optimizer=None) -> tuple:
    """The trained model (this process's copy) and the number of skipped non-finite steps."""
    optimizer = optimizer or optax.adam(config.outer_lr)
    state, checkpoint_dir = runtime.resume(maml.init_state(model, optimizer, key), checkpoint_dir)
    step = runtime.train_step(config, optimizer, inner, strategy=strategy, meta_batch=config.meta_batch)
    sampler = SinusoidTasks(config.meta_batch, config.shots, config.queries or config.shots)
    checkpointer = maml.Checkpointer(checkpoint_dir, config.checkpoint_every) if checkpoint_dir else None
    state, _ = maml.fit(state, step, sampler, num_steps=num_steps, steps_per_call=min(config.steps_per_call, num_steps),
                        checkpointer=checkpointer, hooks=hooks, progress=config.progress and runtime.is_writer(),
                        desc=desc)
    # replicated over devices -> this process's own copy
    return maml.parallel.to_local(state.model), maml.skipped_steps(maml.parallel.to_local(state.opt_state))


@eqx.filter_jit
def query_mse_curve(model, tasks: maml.Task, inner: maml.InnerLoop, max_steps: int, strategy=maml.SecondOrder()):
    """Per task, query MSE after 0..max_steps inner steps (adapting as `inner`/`strategy` do): `[B, max_steps + 1]`."""
    curve = lambda task: maml.adaptation_curve(model, task, inner.with_steps(max_steps), strategy=strategy)
    return jax.vmap(curve)(tasks)


def evaluate(model, lr, config: SinusoidConfig, tasks, inner=None, strategy=maml.SecondOrder()):
    inner = inner if inner is not None else maml.InnerLoop(maml.nn.mse, 1, lr)  # the algorithm's own (ANIL filter, learned rates...)
    curves = np.asarray(query_mse_curve(model, tasks, inner, max(config.eval_steps), strategy))
    mean = curves.mean(axis=0)
    ci = 1.96 * curves.std(axis=0) / np.sqrt(curves.shape[0])
    return {str(s): float(mean[s]) for s in config.eval_steps}, {str(s): float(ci[s]) for s in config.eval_steps}


@eqx.filter_jit
def fit_curves(model, tasks: maml.Task, inner: maml.InnerLoop, max_steps: int, grid):
    """Per task, predictions on `grid [G, 1]` after 0..max_steps inner steps: `[B, max_steps + 1, G, 1]`."""
    one_step = inner.with_steps(1)

    def curves(task):
        def body(m, _):
            m = one_step.adapt(m, task.support_x, task.support_y)[0]
            return m, maml.nn.apply(m, grid)

        _, after = jax.lax.scan(body, model, None, length=max_steps)
        return jnp.concatenate([maml.nn.apply(model, grid)[None], after])

    return jax.vmap(curves)(tasks)


def plot_fits(path: Path, models: dict, config: SinusoidConfig, key, num: int = 3, steps=(0, 1, 10)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, amp, phase = sample_tasks(key, num, config.shots, 1)
    grid = jnp.linspace(*X_RANGE, 200)[:, None]
    preds = {name: np.asarray(fit_curves(model, tasks, maml.InnerLoop(maml.nn.mse, 1, lr), max(steps), grid))
             for name, (model, lr) in models.items()}
    fig, axes = plt.subplots(1, num, figsize=(5 * num, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(grid, sine(amp[i], phase[i], grid), "k-", lw=2, label="true")
        ax.plot(tasks.support_x[i], tasks.support_y[i], "k^", ms=8, label=f"{config.shots} support points")
        for name, color in zip(models, ("C0", "C1")):
            for k, style in zip(steps, (":", "--", "-")):
                ax.plot(grid, preds[name][i, k], style, color=color, label=f"{name}, {k} steps")
        ax.set_title(f"A={float(amp[i]):.2f}, phase={float(phase[i]):.2f}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(SinusoidConfig, argv))
    runtime.initialize(config)
    writer = runtime.is_writer()  # only process 0 writes checkpoints, results and logs
    out = cli.prepare_out(config.out, config, ignore=RESUMABLE) if writer else Path(config.out)
    logger = tracking.start(config, out, job="sinusoid") if writer else None
    # A run that raises is finished as failed in wandb (not left open for the next run of this process).
    with logger or contextlib.nullcontext():
        key = jax.random.PRNGKey(config.seed)
        init_key, train_key, base_key, eval_key, plot_key = jax.random.split(key, 5)
        model = maml.nn.MLP(1, 1, config.hidden, key=init_key)
        algo = algorithms.build_algorithm(config, model, maml.nn.mse, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                                          outer_lr=config.outer_lr, iterations=config.iterations, first_order=config.first_order)
        inner, strategy = algo.inner, algo.strategy

        start = time.perf_counter()
        hooks = [logger.hook(min(config.steps_per_call, config.iterations))] if writer else []
        if writer and config.curvature_every:
            hooks.append(curvature_hook(config, inner, eval_key, logger))
        meta_model, skipped = train(algo.model, config, inner, strategy, optimizer=algo.optimizer, key=train_key,
                                    num_steps=config.iterations, checkpoint_dir=out / "checkpoints", desc="meta-train",
                                    hooks=hooks)
        jax.block_until_ready(meta_model)
        train_seconds = time.perf_counter() - start
        # The paper's baseline: the same network regressing all tasks at once (no inner step in training).
        baseline, _ = train(model, config, maml.InnerLoop(maml.nn.mse, 0, config.inner_lr), maml.SecondOrder(), key=base_key,
                         num_steps=config.baseline_iterations, checkpoint_dir=None, desc="baseline")

        tasks = sample_tasks(eval_key, config.eval_tasks, config.shots, config.eval_points)[0]
        mse, mse_ci = evaluate(meta_model, config.inner_lr, config, tasks, inner, strategy)
        base_mse, base_ci = evaluate(baseline, config.baseline_lr, config, tasks)
        if writer:
            plot_fits(out / "fits.png", {"MAML": (meta_model, config.inner_lr), "pretrained": (baseline, config.baseline_lr)},
                      config, plot_key)
        results = {
            "mse": mse,
            "mse_ci95": mse_ci,
            "baseline_mse": base_mse,
            "baseline_mse_ci95": base_ci,
            "train_seconds": train_seconds,
            "meta_iterations": config.iterations,
            "skipped_steps": skipped,
            "params_sha256": maml.params_sha256(meta_model),
            "config": cli.to_json(config),
            "devices": [str(d) for d in jax.devices()],
        }
        if writer:
            (out / "results.json").write_text(json.dumps(results, indent=2))
            tracking.finish(logger, results, images=[out / "fits.png"])
            print(json.dumps({k: results[k] for k in ("mse", "baseline_mse", "train_seconds", "params_sha256")}))
        return results


if __name__ == "__main__":
    cli.run(main)
