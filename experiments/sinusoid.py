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

import sys
import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import optax

import maml
from data.sinusoid import SinusoidTasks, sample_tasks
from experiments import algorithms as A
from experiments import evaluation as ev
from experiments import cli, runtime, session, tracking
from experiments.config import POSITIVE, SEED, Checked, algorithm_field, at_least, flag, section
from experiments.config_tree import to_flat
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
    seed: int = flag(0, "random seed (model init, tasks)", rule=SEED)
    steps_per_call: int = flag(1000, "meta-iterations per compiled call (lax.scan)", rule=POSITIVE)
    checkpoint_every: int = flag(10_000, "checkpoint period in meta-iterations", rule=POSITIVE)
    skip_nonfinite: int = flag(0, "skip meta-steps with a NaN/inf meta-loss or meta-gradient, up to N in a row "
                                  "(optax.apply_if_finite; counted in results.json); 0: stop the run at the first",
                               rule=at_least(0), absent=0)  # runs from before the flag trained as 0 does


@dataclass(frozen=True)
class Evaluation(Checked):
    """Held-out evaluation, the pretrained baseline and curvature diagnostics (none changes training)."""

    eval_tasks: int = flag(1000, "held-out evaluation tasks", rule=POSITIVE, resumable=True)
    eval_points: int = flag(100, "query points per evaluation task", rule=POSITIVE, resumable=True)
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
    """The family on sinusoid regression, each with its paper's settings where the paper has a sinusoid
    experiment (MAML, Meta-SGD, Reptile's sine demo), else its paper's other settings with MAML's sinusoid
    inner rate (see README, "Algorithms")."""
    maml_steps = (0, 1, 5, 10)  # Finn et al. 2017, Fig. 2: the MSE after 1 and 10 steps (and 5)
    return A.registry(
        A.MAML(inner_steps=1, inner_lr=0.01, eval_steps=maml_steps),
        A.FOMAML(inner_steps=1, inner_lr=0.01, eval_steps=maml_steps),
        A.ANIL(inner_steps=1, inner_lr=0.01, eval_steps=maml_steps),
        A.MetaSGD(inner_steps=1, eval_steps=(0, 1)),  # Li et al. 2017, sec. 4.1: one step, rates from [0.005, 0.1]
        # MAML++ without LSLR here: per-layer rates starting at 0.01 move ~10% per Adam step of 1e-3, and at 5 shots
        # the run then never learns (3,000 iterations: MSE 3.49 after 5 steps with LSLR, 0.74 without; README)
        A.MAMLPlusPlus(inner_steps=5, inner_lr=0.01, lslr=False, msl_iterations=5000, cosine_iterations=70_000,
                       eval_steps=(0, 5)),
        A.Reptile(inner_steps=5, inner_lr=0.02, step_size=0.1, anneal_iterations=30_000, eval_steps=(0, 32)),
        # iMAML-HF (Rajeswaran et al. 2019, its Omniglot table): 5 Newton-CG steps on the proximal problem, lambda 100 so
        # that its step in flat directions is MAML's rate (1 / lambda = 0.01); iMAML-GD is unstable here (README)
        A.IMAML(solver="hf", inner_steps=5, inner_lr=1.0, lambda_=100.0, cg_steps=5, eval_steps=(0, 5)),
    )


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
    algo = config.algorithm.build(model, maml.nn.mse, key=jax.random.fold_in(init_key, 1))
    algo = A.with_skipping(algo, config.training.skip_nonfinite)
    return Setup(algo, maml.init_state(algo.model, algo.optimizer, train_key), model, base_key, eval_key, plot_key)


def train(state: maml.MetaTrainState, algo: A.Algorithm, config: SinusoidConfig, *, num_steps: int, run, hooks=(),
          checkpoints: bool = True, desc: str = "meta-train") -> maml.MetaTrainState:
    """Meta-train `state` with `algo` on this run's devices; the final state as this process's own copy."""
    state, folder = runtime.resume(state, run.out / "checkpoints" if checkpoints else None)
    step = runtime.train_step(config.runtime, algo, meta_batch=config.tasks.meta_batch)
    checkpointer = maml.Checkpointer(folder, config.training.checkpoint_every) if folder else None
    steps_per_call = min(config.training.steps_per_call, num_steps)
    result = maml.fit(state, step, config.tasks.sampler(), num_steps=num_steps, steps_per_call=steps_per_call,
                      checkpointer=checkpointer, hooks=list(hooks), progress=config.progress and run.writer, desc=desc)
    return maml.parallel.to_local(result.state)  # replicated over devices -> this process's own copy


def curvature_hook(run, tasks: maml.Task, inner: maml.InnerLoop, every: int, key: jax.Array) -> maml.Hook:
    """Every `every` steps, log the top eigenvalue, Hutch++ trace (and its standard error over probes) and minimum
    eigenvalue of the support loss and of the meta-objective, and the inner loop's stability (lr x top
    eigenvalue), on the fixed batch `tasks` (`TaskCurvature.metrics`)."""
    diagnose = eqx.filter_jit(lambda model: maml.curvature.task_curvature(
        model, tasks, inner, key=key, k=1, num_iters=20, meta_num_iters=20).metrics())

    def log(info: maml.StepInfo) -> None:
        run.log(info.step, {k: float(v) for k, v in diagnose(maml.parallel.to_local(info.state.model)).items()})

    return maml.Hook(log, every, at_end=False)


def evaluate(model, tasks: maml.Task, inner: maml.InnerLoop, strategy, steps: Sequence[int]) -> ev.TaskResults:
    """Query MSE of every task after each of `steps` inner steps, adapting as `strategy` does."""
    return ev.evaluate_tasks(model, tasks, inner, strategy, steps, maml.nn.mse, over=ev.all_at_once)


def mse_results(name: str, results: ev.TaskResults) -> dict:
    """`NAME`, `NAME_ci95`, `NAME_diverged`, `NAME_diverged_fraction`, by step count (means over the tasks
    that did not diverge)."""
    summary = ev.summarise(results.metric, results.bad, results.steps)
    return {f"{name}{suffix}": {k: v[field] for k, v in summary.items()}
            for suffix, field in (("", "mean"), ("_ci95", "ci95"), ("_diverged", "diverged"),
                                  ("_diverged_fraction", "diverged_fraction"))}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(SinusoidConfig, argv, algorithms))
    runtime.initialize(config.runtime)
    evc, it = config.evaluation, config.training.iterations
    algo, initial, model, base_key, eval_key, plot_key = setup(config)
    with session.run(config, job="sinusoid") as run:
        hooks = run.hooks(min(config.training.steps_per_call, it))
        if evc.curvature_every and run.writer:
            probe = config.tasks.sampler(evc.curvature_tasks)(eval_key)
            hooks.append(curvature_hook(run, probe, algo.inner, evc.curvature_every, eval_key))
        start = time.perf_counter()
        state = train(initial, algo, config, num_steps=it, run=run, hooks=hooks)
        train_seconds = time.perf_counter() - start
        # The paper's baseline: the same network regressing all tasks at once (no inner step in training).
        pretrain = A.Algorithm(model, maml.InnerLoop(maml.nn.mse, 0, evc.baseline_lr), maml.SecondOrder(),
                               optax.adam(evc.baseline_outer_lr), maml.SecondOrder())
        baseline = train(maml.init_state(model, pretrain.optimizer, base_key), pretrain, config,
                         num_steps=evc.baseline_iterations, run=run, checkpoints=False, desc="baseline").model
        tasks = sample_tasks(eval_key, evc.eval_tasks, config.tasks.shots, evc.eval_points)[0]
        steps = config.algorithm.eval_steps
        scores = evaluate(state.model, tasks, algo.inner, algo.evaluation, steps)
        base = evaluate(baseline, tasks, pretrain.inner, maml.SecondOrder(), steps)
        extra, notes = ev.divergences("evaluation", config.algorithm, state.model, algo.inner, scores,
                                      lambda idx: jax.tree.map(lambda a: a[idx], tasks), eval_key)
        for line in notes:
            print(line, file=sys.stderr)
        if run.writer:
            plot_fits(run.out / "fits.png", {config.algorithm.name: (state.model, algo), "pretrained": (baseline, pretrain)},
                      config.tasks.shots, plot_key)
        results = {**mse_results("mse", scores), **mse_results("baseline_mse", base), **extra, "notes": notes,
                   "train_seconds": train_seconds, "meta_iterations": it,
                   "skipped_steps": maml.skipped_steps(state.opt_state), "params_sha256": maml.params_sha256(state.model),
                   "config": to_flat(config), "devices": [str(d) for d in jax.devices()]}
        run.finish(results, images=[run.out / "fits.png"], show=("mse", "baseline_mse", "train_seconds", "params_sha256"))
        return results


if __name__ == "__main__":
    cli.run(main)
