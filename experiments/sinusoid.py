"""Sinusoid regression with MAML (Finn et al. 2017, section 5.1): the project's main job.

    python -m experiments.sinusoid [--shots 5] [--iterations 70000] [--algorithm maml] [--out runs/sinusoid]

Meta-trains an MLP 1-40-40-1 (ReLU) with one inner SGD step (lr 0.01) on K-shot sine tasks, meta-batch
25, Adam 1e-3, 70,000 meta-iterations; then evaluates on 1,000 held-out tasks the MSE after 0, 1, 5 and
10 inner steps, against the paper's baseline (a model pretrained on all tasks, fine-tuned the same way).
Writes OUT/results.json and OUT/fits.png. Re-running the same command resumes from OUT/checkpoints.
Expected with --shots 5: MSE below the paper's 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps.
`--algorithm` picks another member of the family (experiments/algorithms.py), with its own options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import numpy as np
import optax

import maml
from data.sinusoid import SinusoidTasks, sample_tasks
from experiments import algorithms as A
from experiments import cli, runtime, session, tracking
from experiments.config import POSITIVE, Checked, Rule, algorithm_field, at_least, flag, section, to_flat
from experiments.sinusoid_plots import plot_fits


@dataclass(frozen=True)
class Tasks(Checked):
    """Sine tasks y = A sin(x - phase), A in [0.1, 5], phase in [0, pi], x in [-5, 5]."""

    shots: int = flag(10, "K: support points per task", rule=POSITIVE)
    queries: Optional[int] = flag(None, "query points per task in meta-training (default: same as shots)",
                                  rule=POSITIVE)
    meta_batch: int = flag(25, "tasks per meta-iteration", rule=POSITIVE)

    def sampler(self, num_tasks: Optional[int] = None) -> SinusoidTasks:
        return SinusoidTasks(num_tasks or self.meta_batch, self.shots, self.queries or self.shots)


@dataclass(frozen=True)
class Model(Checked):
    """The regression network: an MLP 1 -> hidden -> 1 with ReLU."""

    hidden: tuple[int, ...] = flag((40, 40), "hidden layer sizes", rule=POSITIVE)

    def build(self, key: jax.Array) -> maml.nn.MLP:
        return maml.nn.MLP(1, 1, self.hidden, key=key)


@dataclass(frozen=True)
class Training(Checked):
    """Meta-training."""

    iterations: int = flag(70_000, "meta-iterations", rule=POSITIVE, resumable=True)
    seed: int = flag(0, "random seed (model init, tasks)")
    steps_per_call: int = flag(1000, "meta-iterations per compiled call (lax.scan)", rule=POSITIVE)
    checkpoint_every: int = flag(10_000, "checkpoint period in meta-iterations", rule=POSITIVE)
    skip_nonfinite: int = flag(0, "skip meta-steps with a NaN/inf meta-loss or meta-gradient, up to N in a row "
                                  "(optax.apply_if_finite; counted in results.json); 0: stop the run at the first",
                               rule=at_least(0))


STEP_COUNTS = Rule(lambda v: bool(v) and min(v) >= 0, "non-negative step counts")


@dataclass(frozen=True)
class Evaluation(Checked):
    """Held-out evaluation, the pretrained baseline and curvature diagnostics (none changes training)."""

    eval_tasks: int = flag(1000, "held-out evaluation tasks", rule=POSITIVE, resumable=True)
    eval_points: int = flag(100, "query points per evaluation task", rule=POSITIVE, resumable=True)
    eval_steps: tuple[int, ...] = flag((0, 1, 5, 10), "inner steps at which to report the evaluation MSE",
                                       rule=STEP_COUNTS, resumable=True)
    baseline_iterations: int = flag(10_000, "training steps of the pretrained baseline", rule=POSITIVE,
                                    resumable=True)
    baseline_outer_lr: float = flag(1e-3, "Adam learning rate of the pretrained baseline", rule=POSITIVE,
                                    resumable=True)
    baseline_lr: float = flag(0.02, "fine-tuning SGD step of the baseline (the paper's best, 0.02)", rule=POSITIVE,
                              resumable=True)
    curvature_every: int = flag(0, "curvature diagnostics (maml.curvature.task_curvature) every N meta-iterations, "
                                   "logged; 0: off", rule=at_least(0, " (0: off)"), resumable=True)
    curvature_tasks: int = flag(8, "tasks in the fixed batch the curvature diagnostics look at", rule=POSITIVE,
                                resumable=True)


@dataclass(frozen=True)
class SinusoidConfig(session.ExperimentConfig):
    """MAML sinusoid regression (Finn et al. 2017); defaults are the paper's setup."""

    experiment: ClassVar[str] = "sinusoid"
    tasks: Tasks = section(Tasks)
    model: Model = section(Model)
    algorithm: A.AlgorithmConfig = algorithm_field()
    training: Training = section(Training)
    evaluation: Evaluation = section(Evaluation)
    out: str = flag("runs/sinusoid", "output folder (results.json, fits.png, checkpoints/)", resumable=True)


CONFIG = SinusoidConfig


def algorithms(flags) -> dict[str, A.AlgorithmConfig]:
    """The family on sinusoid regression (today: every algorithm with MAML's inner settings)."""
    return A.registry(A.MAML(), A.FOMAML(), A.ANIL(), A.MetaSGD(), A.MAMLPlusPlus(), A.Reptile(), A.IMAML())


class Setup(NamedTuple):
    """The algorithm, the untrained state (also the structure checkpoints load into), the untrained network
    (the baseline starts from it) and the keys of the baseline, the evaluation tasks and the plot."""

    algo: A.Algorithm
    state: maml.MetaTrainState
    model: maml.nn.MLP
    base_key: jax.Array
    eval_key: jax.Array
    plot_key: jax.Array


def setup(config: SinusoidConfig) -> Setup:
    init_key, train_key, base_key, eval_key, plot_key = jax.random.split(jax.random.PRNGKey(config.training.seed), 5)
    model = config.model.build(init_key)
    algo = config.algorithm.build(model, maml.nn.mse, iterations=config.training.iterations)
    algo = A.with_skipping(algo, config.training.skip_nonfinite)
    return Setup(algo, maml.init_state(algo.model, algo.optimizer, train_key), model, base_key, eval_key, plot_key)


def train(state: maml.MetaTrainState, algo: A.Algorithm, config: SinusoidConfig, *, num_steps: int, run, hooks=(),
          checkpoints: bool = True, desc: str = "meta-train") -> maml.MetaTrainState:
    """Meta-train `state` with `algo` on this run's devices; the final state as this process's own copy."""
    state, folder = runtime.resume(state, run.out / "checkpoints" if checkpoints and run.writer else None)
    step = runtime.train_step(config.runtime, algo, meta_batch=config.tasks.meta_batch)
    checkpointer = maml.Checkpointer(folder, config.training.checkpoint_every) if folder else None
    steps_per_call = min(config.training.steps_per_call, num_steps)
    result = maml.fit(state, step, config.tasks.sampler(), num_steps=num_steps, steps_per_call=steps_per_call,
                      checkpointer=checkpointer, hooks=list(hooks), progress=config.progress and run.writer, desc=desc)
    return maml.parallel.to_local(result.state)  # replicated over devices -> this process's own copy


def curvature_hook(run, tasks: maml.Task, inner: maml.InnerLoop, every: int, key: jax.Array) -> maml.Hook:
    """Every `every` steps, log the top eigenvalue, trace and minimum eigenvalue of the support loss and of the
    meta-objective, and the inner loop's stability (lr x top eigenvalue), on the fixed batch `tasks`."""
    diagnose = eqx.filter_jit(lambda model: maml.curvature.task_curvature(
        model, tasks, inner, key=key, k=1, num_iters=20, meta_num_iters=20).metrics())

    def log(info: maml.StepInfo) -> None:
        run.log(info.step, {k: float(v) for k, v in diagnose(maml.parallel.to_local(info.state.model)).items()})

    return maml.Hook(log, every, at_end=False)


@eqx.filter_jit
def query_mse_curve(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy) -> jax.Array:
    """Per task, query MSE after 0..inner.steps inner steps (adapting as `inner`/`strategy` do): `[B, K + 1]`."""
    return jax.vmap(lambda task: maml.adaptation_curve(model, task, inner, strategy=strategy))(tasks)


def evaluate(model, tasks: maml.Task, inner: maml.InnerLoop, strategy, steps: Sequence[int]) -> tuple[dict, dict]:
    """Mean query MSE over `tasks` after each of `steps` inner steps, and its 95% interval."""
    curves = np.asarray(query_mse_curve(model, tasks, inner.with_steps(max(steps)), strategy))
    mean, ci = curves.mean(axis=0), 1.96 * curves.std(axis=0) / np.sqrt(curves.shape[0])
    return {str(s): float(mean[s]) for s in steps}, {str(s): float(ci[s]) for s in steps}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(SinusoidConfig, argv, algorithms))
    runtime.initialize(config.runtime)
    ev, it = config.evaluation, config.training.iterations
    algo, initial, model, base_key, eval_key, plot_key = setup(config)
    with session.run(config, job="sinusoid") as run:
        hooks = run.hooks(min(config.training.steps_per_call, it))
        if ev.curvature_every and run.writer:
            probe = config.tasks.sampler(ev.curvature_tasks)(eval_key)
            hooks.append(curvature_hook(run, probe, algo.inner, ev.curvature_every, eval_key))
        start = time.perf_counter()
        state = train(initial, algo, config, num_steps=it, run=run, hooks=hooks)
        train_seconds = time.perf_counter() - start
        # The paper's baseline: the same network regressing all tasks at once (no inner step in training).
        pretrain = A.Algorithm(model, maml.InnerLoop(maml.nn.mse, 0, ev.baseline_lr), maml.SecondOrder(),
                               optax.adam(ev.baseline_outer_lr))
        baseline = train(maml.init_state(model, pretrain.optimizer, base_key), pretrain, config,
                         num_steps=ev.baseline_iterations, run=run, checkpoints=False, desc="baseline").model
        tasks = sample_tasks(eval_key, ev.eval_tasks, config.tasks.shots, ev.eval_points)[0]
        mse, mse_ci = evaluate(state.model, tasks, algo.inner, algo.strategy, ev.eval_steps)
        base_mse, base_ci = evaluate(baseline, tasks, pretrain.inner, maml.SecondOrder(), ev.eval_steps)
        if run.writer:
            plot_fits(run.out / "fits.png", {config.algorithm.name: (state.model, algo), "pretrained": (baseline, pretrain)},
                      config.tasks.shots, plot_key)
        results = {"mse": mse, "mse_ci95": mse_ci, "baseline_mse": base_mse, "baseline_mse_ci95": base_ci,
                   "train_seconds": train_seconds, "meta_iterations": it,
                   "skipped_steps": maml.skipped_steps(state.opt_state), "params_sha256": maml.params_sha256(state.model),
                   "config": to_flat(config), "devices": [str(d) for d in jax.devices()]}
        run.finish(results, images=[run.out / "fits.png"], show=("mse", "baseline_mse", "train_seconds", "params_sha256"))
        return results


if __name__ == "__main__":
    cli.run(main)
