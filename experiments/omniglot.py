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

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import jax

import maml
from data.omniglot import IMAGES_PER_CHARACTER, MINIMAL_TEST_ALPHABETS
from data.omniglot_files import IMAGE_SIZE
from experiments import algorithms as A
from experiments import cli, episodic, evaluation, fewshot, runtime, session, tracking
from experiments.config import POSITIVE, Checked, FlagError, algorithm_field, at_least, flag, one_of, section

DEFAULT_CACHE, BATCHINGS = fewshot.DEFAULT_CACHE, episodic.BATCHINGS


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
    batching: Optional[str] = flag(None, episodic.BATCHING_HELP, rule=one_of(BATCHINGS))

    def build(self, ways: int, key: jax.Array) -> maml.nn.Conv4:
        return maml.nn.Conv4(1, ways, self.filters, IMAGE_SIZE, key=key)


@dataclass(frozen=True)
class Training(fewshot.Training):
    """Meta-training, validation and checkpoints."""

    meta_batch: int = flag(32, "tasks per meta-iteration", rule=POSITIVE)


@dataclass(frozen=True)
class Evaluation(fewshot.Evaluation):
    """The final evaluation on the meta-test alphabets (and the adaptation at validation)."""


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


algorithms = fewshot.omniglot_algorithms


def setup(config: OmniglotConfig) -> episodic.Setup:
    return episodic.build(config, lambda key: config.model.build(config.data.ways, key))


def load_splits(data: Data) -> episodic.Splits:
    """The splits of `data` by alphabet, checked to give its episodes (one line naming the split otherwise)."""
    splits = fewshot.omniglot_splits(data.data_dir, data.cache_dir, data.download, data.test_alphabets,
                                     data.val_alphabets)
    return episodic.checked(splits, data.episodes, "alphabets")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(OmniglotConfig, argv, algorithms))
    runtime.initialize(config.runtime)
    built = setup(config)  # everything that can reject the settings runs before anything is written
    return episodic.run_experiment(config, built, load_splits(config.data), job="omniglot")


if __name__ == "__main__":
    cli.run(main)
