"""The meta-training run of the episodic image experiments (experiments.fewshot, experiments.omniglot): their
splits and built values, the step's batching, then training with validation, checkpoints and the time
budget, the final test and results.json.

    built = episodic.build(config, model_fn)                 # algorithm, untrained state, evaluation key
    results = episodic.run_experiment(config, built, splits, job="fewshot")

`config` is either experiment's config tree (sections data, model, training, evaluation, algorithm, runtime);
each function reads the sections it needs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

import maml
from experiments import algorithms as A
from experiments import evaluation, runtime, session
from experiments.config_tree import to_flat

BATCHINGS = {"map": maml.Map(), "vmap": maml.Vmap(), "unroll": maml.Unroll()}
BATCHING_HELP = ("how tasks are batched in the step: " + ", ".join(BATCHINGS) +
                 " (default: the backend's, map on CPU and vmap on GPU/TPU; maml.convolution_batching)")


def batching(name: Optional[str], platform: str) -> maml.AbstractBatching:
    """`--batching`'s value, or where it is unset the measured default for convolutions on `platform`."""
    return maml.convolution_batching(platform) if name is None else BATCHINGS[name]


class Splits(NamedTuple):
    """Class-major images `uint8 [C, n, H, W]` (grey) or `[C, n, H, W, 3]` of each split (`val` None: validate on
    fresh meta-train tasks), the names of what the test split holds and their results.json keys (Omniglot:
    "test_alphabets", and "characters" for the class counts)."""

    train: np.ndarray
    val: Optional[np.ndarray]
    test: np.ndarray
    test_names: tuple[str, ...]
    names_key: str = "test_classes"
    counts_key: str = "classes"


class Setup(NamedTuple):
    """The algorithm, the untrained state (also the structure checkpoints load into), the evaluation key."""

    algo: A.Algorithm
    state: maml.MetaTrainState
    eval_key: jax.Array


def build(config: Any, model_fn: Callable[[jax.Array], Any]) -> Setup:
    """The algorithm around `model_fn(key)`, its untrained state and the evaluation key, from `config.training.seed`."""
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(config.training.seed), 3)
    model = model_fn(init_key)
    algo = config.algorithm.build(model, maml.nn.cross_entropy, key=jax.random.fold_in(init_key, 1))
    algo = A.with_skipping(algo, config.training.skip_nonfinite)
    return Setup(algo, maml.init_state(algo.model, algo.optimizer, train_key), eval_key)


def checked(splits: Splits, episodes: evaluation.Episodes, unit: str = "split") -> Splits:
    """`splits`, checked to give `episodes` (one line naming the split, e.g. "meta-test `unit`", otherwise)."""
    for name, images in (("meta-train", splits.train), ("validation", splits.val), ("meta-test", splits.test)):
        if images is not None:
            try:
                episodes.check(images.shape)
            except ValueError as e:
                raise ValueError(f"{name} {unit}: {e}") from None
    return splits


def validation_hook(run: session.Session, config: Any, images: np.ndarray, algo: A.Algorithm, key: jax.Array,
                    clock: session.Clock) -> maml.Hook:
    """Every `--val-every` steps (and at the end): query accuracy on `--val-tasks` fixed tasks after the
    algorithm's main number of evaluation steps, to validation.jsonl, the console and the logger, diverged
    tasks counted apart. Monitoring only: nothing is selected on it."""
    steps = config.algorithm.eval_steps[-1:]

    def validate(info: maml.StepInfo) -> None:
        start = time.perf_counter()
        model = maml.parallel.to_local(info.state.model)
        res = evaluation.evaluate_episodes(model, images, config.data.episodes, key, config.training.val_tasks,
                                           algo.inner, algo.evaluation, steps)
        val = evaluation.summarise(res.metric, res.bad, steps)[str(steps[0])]
        losses = np.ravel(info.metrics.get("meta_loss", []))
        entry = {"step": info.step, "val_accuracy": val["mean"], "val_accuracy_ci95": val["ci95"],
                 "val_diverged": val["diverged"], "train_loss": float(np.mean(losses)) if losses.size else None,
                 "seconds": time.perf_counter() - clock.start}
        with open(run.out / "validation.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if config.progress:
            tqdm.write(f"step {info.step}: validation accuracy {val['mean']} ± {val['ci95']}"
                       + (f", {val['diverged']} tasks diverged" if val["diverged"] else ""))
        run.log(info.step, {k: v for k, v in {"val/accuracy": val["mean"], "val/ci95": val["ci95"],
                                              "val/diverged": val["diverged"]}.items() if v is not None})
        clock.validation += time.perf_counter() - start

    return maml.Hook(validate, config.training.val_every)


def train(run: session.Session, config: Any, state: maml.MetaTrainState, step, sampler,
          hooks: Sequence[maml.Hook]) -> maml.FitResult:
    """Meta-train from the run's newest checkpoint; the final state as this process's own copy."""
    tr = config.training
    state, folder = runtime.resume(state, run.out / "checkpoints")
    result = maml.fit(state, step, sampler, num_steps=tr.iterations, steps_per_call=min(tr.steps_per_call, tr.iterations),
                      checkpointer=maml.Checkpointer(folder, tr.val_every) if folder else None, hooks=hooks,
                      progress=config.progress and run.writer)
    return result._replace(state=maml.parallel.to_local(result.state))  # replicated -> this process's copy


def test(config: Any, splits: Splits, algo: A.Algorithm, model, key: jax.Array) -> dict:
    """The final evaluation on the test split at each of the algorithm's evaluation step counts: the main
    figure is the last one's, each a mean over the tasks whose adaptation did not diverge."""
    ev, steps, episodes = config.evaluation, config.algorithm.eval_steps, config.data.episodes
    res = evaluation.evaluate_episodes(model, splits.test, episodes, key, ev.eval_tasks, algo.inner, algo.evaluation,
                                       steps)
    by_steps = evaluation.summarise(res.metric, res.bad, steps)
    main = by_steps[str(steps[-1])]
    extra, notes = evaluation.divergences(
        "test", config.algorithm, model, algo.inner, res,
        lambda idx: evaluation.episodes_at(splits.test, episodes, key, ev.eval_tasks, idx), key)
    for line in notes:
        print(line, file=sys.stderr)
    return {"test_accuracy": main["mean"], "test_accuracy_ci95": main["ci95"], "test_tasks": int(res.metric.shape[0]),
            "test_diverged_tasks": main["diverged"], "test_diverged_fraction": main["diverged_fraction"],
            "test_steps": steps[-1], "test_by_steps": by_steps, **extra, "notes": notes}


def summary(config: Any, splits: Splits, result: maml.FitResult, tested: dict, clock: session.Clock,
            batched: maml.AbstractBatching) -> dict:
    state = result.state
    return {
        **tested, "params_sha256": maml.params_sha256(state.model), "meta_iterations": int(state.step),
        "skipped_steps": maml.skipped_steps(state.opt_state), "stopped_by": result.stopped_by,
        "train_seconds_this_run": clock.training(), "validation_seconds_this_run": clock.validation,
        splits.names_key: list(splits.test_names),
        splits.counts_key: {"train": len(splits.train), "validation": 0 if splits.val is None else len(splits.val),
                    "test": len(splits.test)},
        "config": to_flat(config), "devices": [str(d) for d in jax.devices()], "batching": str(batched)}


def run_experiment(config: Any, built: Setup, splits: Splits, *, job: str) -> dict:
    """Meta-train `built` on `splits` with validation, checkpoints and the time budget, then test and write
    results.json (what experiments.fewshot and experiments.omniglot do after building their values)."""
    algo, state, eval_key = built
    tr = config.training
    batched = batching(config.model.batching, jax.default_backend())
    step = runtime.train_step(config.runtime, algo, batching=batched, meta_batch=tr.meta_batch)
    sampler = config.data.episodes.sampler(splits.train, tr.meta_batch)
    chunks = -(-tr.val_every // min(tr.steps_per_call, tr.val_every))  # console: about a line per validation
    with session.run(config, job=job, console_every=chunks + 1) as run:
        val_key, test_key = jax.random.split(eval_key)
        clock = session.Clock()
        hooks = [session.budget_hook(tr.max_minutes, tr.val_every, clock)]
        if run.writer:
            val_images = splits.val if splits.val is not None else sampler.images
            hooks = run.hooks(min(tr.steps_per_call, tr.val_every)) + \
                [validation_hook(run, config, val_images, algo, val_key, clock)] + hooks
        result = train(run, config, state, step, sampler, hooks)
        tested = test(config, splits, algo, result.state.model, test_key)
        results = summary(config, splits, result, tested, clock, batched)
        run.finish(results, show=("test_accuracy", "test_accuracy_ci95", "test_tasks", "meta_iterations",
                                  "params_sha256"))
        return results
