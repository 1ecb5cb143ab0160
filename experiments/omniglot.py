"""Omniglot N-way K-shot classification with MAML and Conv4 (Finn et al. 2017, section 5.2).

    python -m experiments.omniglot --data-dir DIR --ways 5 --shots 1 [--iterations 60000] [--out runs/omniglot]

Defaults are the paper's: Conv4 with 64 filters, meta-batch 32, 15 query images per class, Adam 1e-3,
second-order MAML, 90-degree rotations as new classes; 5-way: 1 inner SGD step of 0.4 in training and 3
at test; 20-way: 5 steps of 0.1 in training and at test (`--inner-steps`, `--inner-lr`, `--eval-steps`
override them; fewer than 20 ways count as 5-way). Batch norm uses each batch's own statistics, also at
test time (transductive over the query set, as MAML does).

Splits are by alphabet. With the full data the meta-test alphabets are the evaluation set; with only the
two minimal background zips, `data.omniglot.MINIMAL_TEST_ALPHABETS` (Korean, Tagalog: 57 of 242
characters) unless `--test-alphabets` names others. Test alphabets are touched once, by the final
evaluation (`--eval-tasks`, at least 600 by default) that writes OUT/results.json (`test_accuracy`, its
95% CI, `test_tasks`, `params_sha256`). Validation every `--val-every` meta-iterations reports query
accuracy after adaptation on `--val-tasks` fixed tasks from `--val-alphabets` (meta-train alphabets held
out of training), or by default from fresh meta-train tasks (it then tracks learning, not transfer); it is
for monitoring only: nothing is selected or stopped on it. Log: OUT/validation.jsonl.

Checkpoints (atomic) go to OUT/checkpoints at each validation; re-running the same command resumes, and a
resumed run ends with the same parameters as an uninterrupted one. `--max-minutes` stops training at the
first validation past the budget; results.json then records the iterations reached, and `--iterations N`
with that N reproduces the run exactly. Expected (paper, full background set, 60,000 iterations): 98.7%
5-way 1-shot. On 2 CPU cores see benchmarks/RESULTS.md.

The same mixins as experiments/sinusoid.py: `--algorithm {maml,fomaml,anil,metasgd,mamlpp,reptile,imaml}`
and their options (experiments/algorithms.py; `--first-order` turns maml into fomaml; validation and test
adapt as the algorithm does: ANIL's head only, Meta-SGD / LSLR learned rates, iMAML's proximal term;
`--mamlpp-per-step-bn` uses `maml.nn.PerStep`), `--devices` / `--coordinator` / `--num-processes` /
`--process-id` (experiments/runtime.py: the task batch split across devices, `--meta-batch` a multiple of
them; only process 0 writes), and `--wandb ...` (experiments/tracking.py: config, `train/meta_loss`,
`val/accuracy` and `val/ci95` at each validation, test metrics, results.json as the run summary).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

import maml
from data.episodes import EpisodeSampler, check_episode_args, episode_sampler
from data.omniglot import IMAGE_SIZE, IMAGES_PER_CHARACTER, MINIMAL_TEST_ALPHABETS, load_omniglot, split_by_alphabet
from experiments import algorithms, cli, runtime, tracking

DEFAULT_CACHE = Path.home() / ".cache" / "maml_jax" / "tfds"
EVAL_BLOCK = 100  # tasks drawn and evaluated per compiled call (task i of block b: fold_in(fold_in(key, b), i))


_f = cli.flag


def batchings() -> dict[str, type]:
    """Task-batching values exported by `maml`, by lower-case class name (e.g. "vmap", "map", "unroll")."""
    found = {}
    for name in maml.__all__:
        obj = getattr(maml, name)
        if isinstance(obj, type) and issubclass(obj, maml.AbstractBatching) and obj is not maml.AbstractBatching:
            found[name.lower()] = obj
    return found


@dataclass(frozen=True)
class OmniglotConfig(tracking.Tracking, runtime.RuntimeConfig, algorithms.AlgorithmConfig):
    """MAML on Omniglot (Finn et al. 2017); defaults are the paper's setup (see the module docstring)."""

    data_dir: Optional[str] = _f(None, "folder holding the Omniglot zips under their original names (required)")
    cache_dir: Optional[str] = _f(None, f"tfds cache of the built splits (default: {DEFAULT_CACHE})")
    download: bool = _f(False, "download missing zips from their public home")
    test_alphabets: tuple[str, ...] = _f(
        (), "alphabets held out for meta-test (default: the evaluation set; with only the minimal zips: "
        + ",".join(MINIMAL_TEST_ALPHABETS) + ")")
    val_alphabets: tuple[str, ...] = _f((), "meta-train alphabets held out for validation (default: none; "
                                            "validate on fresh meta-train tasks)")
    ways: int = _f(5, "N: classes per task")
    shots: int = _f(1, "K: support images per class")
    queries: int = _f(15, "query images per class")
    inner_steps: Optional[int] = _f(None, "inner SGD steps in meta-training (default: 1 for 5-way, 5 for 20-way)")
    inner_lr: Optional[float] = _f(None, "inner SGD learning rate (default: 0.4 for 5-way, 0.1 for 20-way)")
    eval_steps: Optional[int] = _f(None, "inner steps at validation and test (default: 3 for 5-way, 5 for 20-way)")
    first_order: bool = _f(False, "first-order MAML (no second derivatives)")
    meta_batch: int = _f(32, "tasks per meta-iteration")
    outer_lr: float = _f(1e-3, "Adam learning rate of the meta-update")
    filters: int = _f(64, "Conv4 filters per layer")
    iterations: int = _f(60_000, "meta-iterations")
    max_minutes: Optional[float] = _f(None, "stop training at the first validation after this many minutes")
    batching: str = _f("map", "how tasks are batched in the step: " + ", ".join(batchings()))
    seed: int = _f(0, "random seed (model init, tasks)")
    steps_per_call: int = _f(10, "meta-iterations per compiled call (lax.scan)")
    val_every: int = _f(500, "validate and checkpoint every N meta-iterations")
    val_tasks: int = _f(100, "validation tasks")
    eval_tasks: int = _f(600, "held-out test tasks of the final evaluation")
    out: str = _f("runs/omniglot", "output folder (results.json, validation.jsonl, checkpoints/)")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data-dir is required; expected the folder holding the Omniglot zips")
        cli.check_positive(self, "ways", "shots", "inner_lr", "meta_batch", "outer_lr", "filters", "iterations",
                           "max_minutes", "steps_per_call", "val_every", "val_tasks", "eval_tasks")
        if self.queries < 1:
            raise ValueError(f"--queries={self.queries}; expected an integer >= 1")
        if self.shots + self.queries > IMAGES_PER_CHARACTER:
            raise ValueError(f"--shots + --queries = {self.shots} + {self.queries} = {self.shots + self.queries}; "
                             f"expected at most the {IMAGES_PER_CHARACTER} images of an Omniglot character")
        if self.batching not in batchings():
            raise ValueError(f"--batching={self.batching!r}; expected one of {', '.join(batchings())}")
        twenty = self.ways >= 20  # the paper's 20-way settings; fewer ways use its 5-way ones
        for name, default in (("inner_steps", 5 if twenty else 1), ("inner_lr", 0.1 if twenty else 0.4),
                              ("eval_steps", 5 if twenty else 3)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)  # resolved, so config.json records the values used
        for name in ("inner_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{cli.field_flag(name)}={getattr(self, name)}; expected an integer >= 1")
        super().__post_init__()  # the mixins' checks (algorithm, runtime)


# Fields that may change between a run and its resumption (they do not change training).
RESUMABLE = ("iterations", "max_minutes", "progress", "out", "cache_dir", "download", "val_tasks", "eval_tasks",
             "eval_steps") + tracking.FIELDS + runtime.RUNTIME_FIELDS


def make_model(config: OmniglotConfig, key: jax.Array) -> maml.nn.Conv4:
    """Conv4; with `--algorithm mamlpp --mamlpp-per-step-bn`, a `maml.nn.PerStep` Conv4 (same initial weights)
    with one row of batch-norm scale and offset per training inner step, as MAML++ does: step k's support
    loss and the query loss after it use row k, so a row K would never be trained; evaluation with more
    steps than training (`--eval-steps` > `--inner-steps`) keeps using the last trained row."""
    conv4 = maml.nn.Conv4(1, config.ways, config.filters, IMAGE_SIZE, key=key)
    if config.algorithm == "mamlpp" and config.mamlpp_per_step_bn:
        return maml.nn.PerStep(conv4, config.inner_steps)
    return conv4


def make_algorithm(config: OmniglotConfig, key: jax.Array) -> algorithms.Algorithm:
    """`config.algorithm`'s model (wrapped for learned rates), inner loop, strategy and outer optimiser."""
    return algorithms.build_algorithm(config, make_model(config, key), maml.nn.cross_entropy,
                                      inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                                      outer_lr=config.outer_lr, iterations=config.iterations,
                                      first_order=config.first_order)


def make_inner(config: OmniglotConfig, steps: int) -> maml.InnerLoop:
    """The algorithm's inner loop (ANIL: head only) with `steps` steps."""
    return make_algorithm(config, jax.random.PRNGKey(config.seed)).inner.with_steps(steps)


def setup(config: OmniglotConfig) -> tuple[algorithms.Algorithm, maml.MetaTrainState, jax.Array]:
    """The algorithm, the untrained state (also the structure checkpoints load into) and the key for evaluation."""
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    algo = make_algorithm(config, init_key)
    return algo, maml.init_state(algo.model, algo.optimizer, train_key), eval_key


def initial_state(config: OmniglotConfig) -> tuple[maml.MetaTrainState, jax.Array]:
    """The untrained state (also the structure checkpoints load into) and the key for evaluation."""
    return setup(config)[1:]


def resolve_test_alphabets(data: dict[str, np.ndarray], names: Sequence[str]) -> tuple[str, ...]:
    """`names`, or the evaluation set's alphabets when present, else `MINIMAL_TEST_ALPHABETS`."""
    if names:
        return tuple(names)
    if not data["background"].all():
        return tuple(sorted(set(data["alphabet"][~data["background"]].tolist())))
    return MINIMAL_TEST_ALPHABETS


def split_data(config: OmniglotConfig, data: dict[str, np.ndarray]):
    """(train, validation or None, test) images `uint8 [C, 20, 28, 28]`, split by alphabet, and test names."""
    test_names = resolve_test_alphabets(data, config.test_alphabets)
    train, test = split_by_alphabet(data, test_names)
    if not config.val_alphabets:
        return train, None, test, test_names
    clash = sorted(set(config.val_alphabets) & set(test_names))
    if clash:
        raise ValueError(f"--val-alphabets={','.join(config.val_alphabets)} includes test alphabets {clash}; "
                         "expected meta-train alphabets only")
    keep = ~np.isin(data["alphabet"], test_names)
    train, val = split_by_alphabet({k: v[keep] for k, v in data.items()}, config.val_alphabets)
    return train, val, test, test_names


_draw = eqx.filter_jit(lambda sampler, key: sampler(key))  # the sampler (with its images) is an argument


@eqx.filter_jit
def _accuracies(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy) -> jax.Array:
    """Query accuracy after `inner` adapts `model` to each task as `strategy` does (learned rates, ANIL's
    filter, iMAML's proximal term; per-step networks at the last step), `lax.map`: one task at a time."""

    def one(task: maml.Task) -> jax.Array:
        adapted = strategy.adapt(inner, model, task.support_x, task.support_y).model
        net = maml.network(adapted, max(inner.steps - 1, 0))  # what the query loss sees after adapting
        return maml.nn.accuracy(net, task.query_x, task.query_y)

    return jax.lax.map(one, tasks)


def task_accuracies(model, images: np.ndarray | jax.Array, config: OmniglotConfig, key: jax.Array,
                    num_tasks: int, inner: Optional[maml.InnerLoop] = None,
                    strategy: maml.AbstractStrategy = maml.SecondOrder()) -> np.ndarray:
    """Per-task query accuracy on `num_tasks` tasks drawn from `images` (depends only on key and count),
    adapting with `inner` (default: the algorithm's inner loop) for `--eval-steps` steps as `strategy` does."""
    block = min(EVAL_BLOCK, num_tasks)
    sampler = episode_sampler(images, config.ways, config.shots, config.queries, block)
    inner = (inner if inner is not None else make_inner(config, config.eval_steps)).with_steps(config.eval_steps)
    parts = [np.asarray(_accuracies(model, _draw(sampler, jax.random.fold_in(key, b)), inner, strategy))
             for b in range(math.ceil(num_tasks / block))]
    return np.concatenate(parts)[:num_tasks]


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), 1.96 * std / math.sqrt(len(values))


def _process0(flag: bool) -> bool:
    """`flag` of process 0, on every process (a decision all of them must take together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(OmniglotConfig, argv))
    runtime.initialize(config)
    writer = runtime.is_writer()  # only process 0 writes checkpoints, results and logs
    # Everything that can reject the settings runs before anything is written (data cache included).
    algo, state, eval_key = setup(config)
    step = runtime.train_step(config, algo.optimizer, algo.inner, strategy=algo.strategy,
                              batching=batchings()[config.batching](), meta_batch=config.meta_batch)
    cache = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE
    data = load_omniglot(config.data_dir, cache, download=config.download)
    train_images, val_images, test_images, test_names = split_data(config, data)
    # Build every sampler now, so that impossible settings (e.g. more ways than classes) fail before training.
    try:
        sampler = episode_sampler(train_images, config.ways, config.shots, config.queries, config.meta_batch)
    except ValueError as e:
        raise ValueError(f"meta-train alphabets: {e}") from None
    for name, images in (("validation", val_images), ("meta-test", test_images)):
        if images is not None:
            try:
                check_episode_args(images.shape, config.ways, config.shots, config.queries, rotate=True)
            except ValueError as e:
                raise ValueError(f"{name} alphabets: {e}") from None
    out = cli.prepare_out(config.out, config, ignore=RESUMABLE) if writer else Path(config.out)
    ckpt_dir = out / "checkpoints"
    # On the console: about one line per validation (fit's chunks are short: --steps-per-call).
    chunks = -(-config.val_every // min(config.steps_per_call, config.val_every))
    logger = tracking.start(config, out, job="omniglot", console_every=chunks + 1) if writer else None
    # A run that raises is finished as failed in wandb (not left open for the next run of this process).
    with logger or contextlib.nullcontext():
        initial = state
        val_key, test_key = jax.random.split(eval_key)
        val_source = val_images if val_images is not None else sampler.images
        eval_inner = algo.inner.with_steps(config.eval_steps)  # adapts as the algorithm does, --eval-steps steps
        start = time.perf_counter()
        deadline = start + 60 * config.max_minutes if config.max_minutes else None
        val_seconds = [0.0]

        def validate(info: maml.StepInfo) -> None:  # monitoring only: nothing is selected on it
            val_start = time.perf_counter()
            model = maml.parallel.to_local(info.state.model)
            acc, ci = mean_ci95(task_accuracies(model, val_source, config, val_key, config.val_tasks,
                                                eval_inner, algo.strategy))
            losses = np.ravel(info.metrics.get("meta_loss", []))
            entry = {"step": info.step, "val_accuracy": acc, "val_accuracy_ci95": ci,
                     "train_loss": float(np.mean(losses)) if losses.size else None,
                     "seconds": time.perf_counter() - start}
            with open(out / "validation.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if config.progress:
                tqdm.write(f"step {info.step}: validation accuracy {acc:.3f} ± {ci:.3f}")
            logger.log_scalars(info.step, {k: v for k, v in {"val/accuracy": acc, "val/ci95": ci}.items()
                                           if math.isfinite(v)})  # (the CI is NaN for a single task)
            val_seconds[0] += time.perf_counter() - val_start

        def budget(info: maml.StepInfo) -> Optional[maml.Stop]:
            late = deadline is not None and time.perf_counter() > deadline and not info.final
            return maml.Stop("max_minutes") if _process0(late) else None

        hooks = [maml.Hook(budget, config.val_every, at_end=False)]
        if writer:
            hooks = [logger.hook(min(config.steps_per_call, config.val_every)), maml.Hook(validate, config.val_every)] + hooks
        state, fit_dir = runtime.resume(state, ckpt_dir)
        checkpointer = maml.Checkpointer(fit_dir, config.val_every) if fit_dir is not None else None
        state, stopped_by = maml.fit(state, step, sampler, num_steps=config.iterations,
                                     steps_per_call=min(config.steps_per_call, config.iterations),
                                     checkpointer=checkpointer, hooks=hooks, progress=config.progress and writer)
        model = maml.parallel.to_local(state.model)  # replicated over devices -> this process's own copy
        jax.block_until_ready(model)
        train_seconds = time.perf_counter() - start - val_seconds[0]  # compile included, validation not

        accs = task_accuracies(model, test_images, config, test_key, config.eval_tasks, eval_inner, algo.strategy)
        acc, ci = mean_ci95(accs)
        results = {
            "test_accuracy": acc,
            "test_accuracy_ci95": ci,
            "test_tasks": int(len(accs)),
            "params_sha256": maml.params_sha256(model),
            "meta_iterations": int(state.step),
            "skipped_steps": maml.skipped_steps(maml.parallel.to_local(state.opt_state)),
            "stopped_by": stopped_by,
            "train_seconds_this_run": train_seconds,
            "validation_seconds_this_run": val_seconds[0],
            "test_alphabets": list(test_names),
            "characters": {"train": len(train_images), "validation": 0 if val_images is None else len(val_images),
                           "test": len(test_images)},
            "config": cli.to_json(config),
            "devices": [str(d) for d in jax.devices()],
        }
        if writer:
            (out / "results.json").write_text(json.dumps(results, indent=2))
            tracking.finish(logger, results)
            print(json.dumps({k: results[k] for k in ("test_accuracy", "test_accuracy_ci95", "test_tasks",
                                                      "meta_iterations", "params_sha256")}))
        return results


if __name__ == "__main__":
    cli.run(main)
