"""Omniglot N-way K-shot classification with the MAML family and Conv4 (Finn et al. 2017, section 5.2).

    python -m experiments.omniglot --data-dir DIR --ways 5 --shots 1 [--algorithm maml] [--out runs/omniglot]

Defaults are the MAML paper's: Conv4 with 64 filters and batch norm with each batch's own statistics (also at
test time, transductive over the query set, as MAML does), meta-batch 32, 15 queries per class, Adam 1e-3,
90-degree rotations as new classes; every `--algorithm` has its own paper's inner loop and evaluation steps
(experiments/algorithms.py; MAML: 5-way 1 step of 0.4 and 3 at test, 20-way 5 steps of 0.1).

Splits are by alphabet: the evaluation set's alphabets are meta-test, or with only the two minimal background
zips `data.omniglot.MINIMAL_TEST_ALPHABETS` (Korean, Tagalog), or `--test-alphabets`. They are touched once,
by the final evaluation (`--eval-tasks`, 600 by default) that writes OUT/results.json (`test_accuracy` with
its 95% CI over the tasks whose adaptation did not diverge, the diverged count, `params_sha256`). Validation
every `--val-every` meta-iterations (on `--val-alphabets`, or fresh meta-train tasks) is monitoring only;
log: OUT/validation.jsonl. Checkpoints go to OUT/checkpoints at each validation; re-running the same command
resumes to the same parameters as an uninterrupted run. `--max-minutes` stops at the first validation past
the budget (results.json records the iterations reached; `--iterations N` reproduces the run). Devices and
processes: experiments/runtime.py; tracking: experiments/tracking.py. Expected (paper, full background set,
60,000 iterations): 98.7% 5-way 1-shot; on 2 CPU cores see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

import maml
from data.episodes import check_episode_args, episode_sampler
from data.omniglot import IMAGE_SIZE, IMAGES_PER_CHARACTER, MINIMAL_TEST_ALPHABETS, load_omniglot, split_by_alphabet
from experiments import algorithms as A
from experiments import cli, evaluation, runtime, session, tracking
from experiments.config import POSITIVE, Checked, FlagError, algorithm_field, at_least, flag, one_of, section, to_flat

DEFAULT_CACHE = Path.home() / ".cache" / "maml_jax" / "tfds"
BATCHINGS = {"map": maml.Map(), "vmap": maml.Vmap(), "unroll": maml.Unroll()}


@dataclass(frozen=True)
class Data(Checked):
    """Omniglot from its original zips, split by alphabet; N-way K-shot episodes with rotations as classes."""

    data_dir: Optional[str] = flag(None, "folder holding the Omniglot zips under their original names (required)")
    cache_dir: Optional[str] = flag(None, f"tfds cache of the built splits (default: {DEFAULT_CACHE})", resumable=True)
    download: bool = flag(False, "download missing zips from their public home", resumable=True)
    test_alphabets: tuple[str, ...] = flag(
        (), "alphabets held out for meta-test (default: the evaluation set; with only the minimal zips: "
        + ",".join(MINIMAL_TEST_ALPHABETS) + ")")
    val_alphabets: tuple[str, ...] = flag((), "meta-train alphabets held out for validation (default: none; "
                                              "validate on fresh meta-train tasks)")
    ways: int = flag(5, "N: classes per task", rule=POSITIVE)
    shots: int = flag(1, "K: support images per class", rule=POSITIVE)
    queries: int = flag(15, "query images per class", rule=at_least(1))

    def __post_init__(self):
        if not self.data_dir:
            raise FlagError("--data-dir", "--data-dir is required; expected the folder holding the Omniglot zips")
        super().__post_init__()
        if self.shots + self.queries > IMAGES_PER_CHARACTER:
            raise FlagError("--queries", f"--shots + --queries = {self.shots} + {self.queries} = "
                            f"{self.shots + self.queries}; expected at most the {IMAGES_PER_CHARACTER} images of an "
                            "Omniglot character")

    @property
    def episodes(self) -> evaluation.Episodes:
        return evaluation.Episodes(self.ways, self.shots, self.queries)


@dataclass(frozen=True)
class Model(Checked):
    """Conv4 (batch norm with batch statistics) and how a batch of tasks is mapped in the step."""

    filters: int = flag(64, "Conv4 filters per layer", rule=POSITIVE)
    batching: str = flag("map", "how tasks are batched in the step: " + ", ".join(BATCHINGS), rule=one_of(BATCHINGS))

    def build(self, ways: int, key: jax.Array) -> maml.nn.Conv4:
        return maml.nn.Conv4(1, ways, self.filters, IMAGE_SIZE, key=key)


@dataclass(frozen=True)
class Training(Checked):
    """Meta-training, validation and checkpoints."""

    meta_batch: int = flag(32, "tasks per meta-iteration", rule=POSITIVE)
    iterations: int = flag(60_000, "meta-iterations", rule=POSITIVE, resumable=True)
    max_minutes: Optional[float] = flag(None, "stop training at the first validation after this many minutes",
                                        rule=POSITIVE, resumable=True)
    seed: int = flag(0, "random seed (model init, tasks)")
    steps_per_call: int = flag(10, "meta-iterations per compiled call (lax.scan)", rule=POSITIVE)
    val_every: int = flag(500, "validate and checkpoint every N meta-iterations", rule=POSITIVE)
    val_tasks: int = flag(100, "validation tasks", rule=POSITIVE, resumable=True)
    skip_nonfinite: int = flag(0, "skip meta-steps with a NaN/inf meta-loss or meta-gradient, up to N in a row "
                                  "(optax.apply_if_finite; counted in results.json); 0: stop the run at the first",
                               rule=at_least(0))


@dataclass(frozen=True)
class Evaluation(Checked):
    """The final evaluation on the meta-test alphabets (and the adaptation at validation)."""

    eval_tasks: int = flag(600, "held-out test tasks of the final evaluation", rule=POSITIVE, resumable=True)


@dataclass(frozen=True)
class OmniglotConfig(session.ExperimentConfig):
    """MAML on Omniglot (Finn et al. 2017); defaults are the paper's setup (see the module docstring)."""

    experiment: ClassVar[str] = "omniglot"
    data: Data = section(Data)
    model: Model = section(Model)
    algorithm: A.AlgorithmConfig = algorithm_field()
    training: Training = section(Training)
    evaluation: Evaluation = section(Evaluation)
    out: str = flag("runs/omniglot", "output folder (results.json, validation.jsonl, checkpoints/)", resumable=True)


CONFIG = OmniglotConfig


def algorithms(flags) -> dict[str, A.AlgorithmConfig]:
    """The family on Omniglot, each with its paper's (or released code's) Omniglot settings for 5-way, or
    20-way from 20 ways on (see README, "Algorithms"; the meta-batch is the experiment's, the same for all)."""
    twenty = flags["ways"] >= 20
    # Finn et al. 2017, sec. 5.2: 5-way 1 step of 0.4, 3 at test; 20-way 5 steps of 0.1, 5 at test.
    maml_inner = dict(inner_steps=5, inner_lr=0.1, eval_steps=(5,)) if twenty else \
        dict(inner_steps=1, inner_lr=0.4, eval_steps=(3,))
    return A.registry(
        A.MAML(**maml_inner),
        A.FOMAML(**maml_inner),
        A.ANIL(**maml_inner),  # Raghu et al. 2020 keep MAML's settings
        # Li et al. 2017: one step, rates uniform in [0.005, 0.1]; evaluated at the trained step count
        A.MetaSGD(inner_steps=1, eval_steps=(1,)),
        # the MAML++ release (experiment_config/omniglot_maml++*): 5 steps, LSLR from 0.1, per-step batch norm,
        # MSL over 10 (20-way: 20) epochs of 500 iterations, cosine over 100 (250) epochs, second order throughout
        A.MAMLPlusPlus(inner_steps=5, inner_lr=0.1, per_step_bn=True, msl_iterations=10_000 if twenty else 5000,
                       cosine_iterations=125_000 if twenty else 50_000, eval_steps=(5,)),
        # Nichol et al. 2018 (supervised-reptile README, 1-shot 5/20-way): 12 inner iterations, outer step 1
        # annealed to 0 over 200,000 iterations, evaluation after 86 (20-way: 97) iterations; their inner Adam
        # (lr 0.00044, minibatches of 12 training shots) is SGD on the support set here
        A.Reptile(inner_steps=12, inner_lr=0.1, step_size=1.0, anneal_iterations=200_000,
                  eval_steps=(97,) if twenty else (86,)),
        # Rajeswaran et al. 2019 (imaml_dev examples): 16 inner steps of 0.1 (25 for 20-way), lambda 2, 5 CG steps;
        # accuracy measured after the same steps of plain SGD (lambda 0)
        A.IMAML(inner_steps=25 if twenty else 16, inner_lr=0.1, lambda_=2.0, cg_steps=5,
                eval_steps=(25,) if twenty else (16,)),
    )


class Setup(NamedTuple):
    """The algorithm, the untrained state (also the structure checkpoints load into), the evaluation key."""

    algo: A.Algorithm
    state: maml.MetaTrainState
    eval_key: jax.Array


def setup(config: OmniglotConfig) -> Setup:
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(config.training.seed), 3)
    model = config.model.build(config.data.ways, init_key)
    algo = config.algorithm.build(model, maml.nn.cross_entropy, key=jax.random.fold_in(init_key, 1))
    algo = A.with_skipping(algo, config.training.skip_nonfinite)
    return Setup(algo, maml.init_state(algo.model, algo.optimizer, train_key), eval_key)


class Splits(NamedTuple):
    """Class-major images `uint8 [C, 20, 28, 28]` of each split (no validation split unless asked for)."""

    train: np.ndarray
    val: Optional[np.ndarray]
    test: np.ndarray
    test_alphabets: tuple[str, ...]


def load_splits(data: Data) -> Splits:
    """The splits of `data`, checked to give its episodes (one line naming the split otherwise)."""
    arrays = load_omniglot(data.data_dir, Path(data.cache_dir) if data.cache_dir else DEFAULT_CACHE,
                           download=data.download)
    names = tuple(data.test_alphabets)
    if not names:  # the evaluation set's alphabets when present, else the minimal split's
        names = tuple(sorted(set(arrays["alphabet"][~arrays["background"]].tolist()))) \
            if not arrays["background"].all() else MINIMAL_TEST_ALPHABETS
    train, test = split_by_alphabet(arrays, names)
    val = None
    if data.val_alphabets:
        clash = sorted(set(data.val_alphabets) & set(names))
        if clash:
            raise FlagError("--val-alphabets", f"--val-alphabets={','.join(data.val_alphabets)} includes test "
                            f"alphabets {clash}; expected meta-train alphabets only")
        keep = ~np.isin(arrays["alphabet"], names)
        train, val = split_by_alphabet({k: v[keep] for k, v in arrays.items()}, data.val_alphabets)
    for name, images in (("meta-train", train), ("validation", val), ("meta-test", test)):
        if images is not None:
            try:
                check_episode_args(images.shape, *data.episodes, rotate=True)
            except ValueError as e:
                raise ValueError(f"{name} alphabets: {e}") from None
    return Splits(train, val, test, names)


def validation_hook(run: session.Session, config: OmniglotConfig, images: np.ndarray, algo: A.Algorithm,
                    key: jax.Array, clock: session.Clock) -> maml.Hook:
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


def train(run: session.Session, config: OmniglotConfig, state: maml.MetaTrainState, step, sampler,
          hooks: Sequence[maml.Hook]) -> maml.FitResult:
    """Meta-train from the run's newest checkpoint; the final state as this process's own copy."""
    tr = config.training
    state, folder = runtime.resume(state, run.out / "checkpoints" if run.writer else None)
    result = maml.fit(state, step, sampler, num_steps=tr.iterations, steps_per_call=min(tr.steps_per_call, tr.iterations),
                      checkpointer=maml.Checkpointer(folder, tr.val_every) if folder else None, hooks=hooks,
                      progress=config.progress and run.writer)
    return result._replace(state=maml.parallel.to_local(result.state))  # replicated -> this process's copy


def test(config: OmniglotConfig, splits: Splits, algo: A.Algorithm, model, key: jax.Array) -> dict:
    """The final evaluation on the meta-test alphabets at each of the algorithm's evaluation step counts: the
    main figure is the last one's, each a mean over the tasks whose adaptation did not diverge."""
    ev, steps = config.evaluation, config.algorithm.eval_steps
    res = evaluation.evaluate_episodes(model, splits.test, config.data.episodes, key, ev.eval_tasks, algo.inner,
                                       algo.evaluation, steps)
    by_steps = evaluation.summarise(res.metric, res.bad, steps)
    main = by_steps[str(steps[-1])]
    extra, notes = evaluation.divergences(
        "test", config.algorithm, model, algo.inner, res,
        lambda idx: evaluation.episodes_at(splits.test, config.data.episodes, key, ev.eval_tasks, idx), key)
    for line in notes:
        print(line, file=sys.stderr)
    return {"test_accuracy": main["mean"], "test_accuracy_ci95": main["ci95"], "test_tasks": int(res.metric.shape[0]),
            "test_diverged_tasks": main["diverged"], "test_diverged_fraction": main["diverged_fraction"],
            "test_steps": steps[-1], "test_by_steps": by_steps, **extra, "notes": notes}


def summary(config: OmniglotConfig, splits: Splits, result: maml.FitResult, tested: dict, clock: session.Clock) -> dict:
    state = result.state
    return {
        **tested, "params_sha256": maml.params_sha256(state.model), "meta_iterations": int(state.step),
        "skipped_steps": maml.skipped_steps(state.opt_state), "stopped_by": result.stopped_by,
        "train_seconds_this_run": clock.training(), "validation_seconds_this_run": clock.validation,
        "test_alphabets": list(splits.test_alphabets),
        "characters": {"train": len(splits.train), "validation": 0 if splits.val is None else len(splits.val),
                       "test": len(splits.test)},
        "config": to_flat(config), "devices": [str(d) for d in jax.devices()]}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(OmniglotConfig, argv, algorithms))
    runtime.initialize(config.runtime)
    # Everything that can reject the settings runs before anything is written (data cache included).
    algo, state, eval_key = setup(config)
    tr = config.training
    step = runtime.train_step(config.runtime, algo, batching=BATCHINGS[config.model.batching], meta_batch=tr.meta_batch)
    splits = load_splits(config.data)
    sampler = episode_sampler(splits.train, *config.data.episodes, tr.meta_batch)
    chunks = -(-tr.val_every // min(tr.steps_per_call, tr.val_every))  # console: about a line per validation
    with session.run(config, job="omniglot", console_every=chunks + 1) as run:
        val_key, test_key = jax.random.split(eval_key)
        clock = session.Clock()
        hooks = [session.budget_hook(tr.max_minutes, tr.val_every, clock)]
        if run.writer:
            val_images = splits.val if splits.val is not None else sampler.images
            hooks = run.hooks(min(tr.steps_per_call, tr.val_every)) + \
                [validation_hook(run, config, val_images, algo, val_key, clock)] + hooks
        result = train(run, config, state, step, sampler, hooks)
        results = summary(config, splits, result, test(config, splits, algo, result.state.model, test_key), clock)
        run.finish(results, show=("test_accuracy", "test_accuracy_ci95", "test_tasks", "meta_iterations",
                                  "params_sha256"))
        return results


if __name__ == "__main__":
    cli.run(main)
