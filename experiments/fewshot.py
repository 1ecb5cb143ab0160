"""Few-shot image classification with the MAML family on every image benchmark (Finn et al. 2017, section 5.2).

    python -m experiments.fewshot --dataset mini_imagenet --data-dir DIR --ways 5 --shots 1 \\
        [--backbone conv4|resnet12] [--algorithm maml] [--out runs/fewshot]

`--dataset` is one of `DATASETS`: omniglot (the original zips, split by alphabet, rotations as classes),
mini_imagenet, tiered_imagenet, cifar_fs, fc100 (their usual files, read by data/images; train / val / test
splits by class). Defaults are each dataset's papers': MAML on mini-ImageNet (and the other natural-image
sets) Conv4 with 32 filters, 5 inner steps of 0.01 in training and 10 at test, meta-batch 4 for 1-shot and 2
for 5-shot, 15 queries, Adam 1e-3; on Omniglot those of experiments.omniglot. Every `--algorithm` has its
own paper's settings where its paper has them (README, "Algorithms"; `--help`).

Validation every `--val-every` meta-iterations is on the validation split (Omniglot: on fresh meta-train
tasks) and only monitors; the final evaluation on `--eval-tasks` (600) test episodes writes
OUT/results.json (`test_accuracy` with its 95% interval over the tasks whose adaptation did not diverge, the
diverged count, `params_sha256`). Checkpoints, resume, `--max-minutes`, devices and tracking are exactly as in
experiments.omniglot, which is this experiment's Omniglot entry with its alphabet options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence

import jax
import numpy as np

import maml
from data import images as image_data
from data.omniglot import MINIMAL_TEST_ALPHABETS, load_omniglot, split_by_alphabet
from data.omniglot_files import IMAGE_SIZE
from experiments import algorithms as A
from experiments import cli, episodic, evaluation, runtime, session, tracking
from experiments.config import (POSITIVE, SEED, Checked, FlagError, Rule, algorithm_field, at_least, flag, one_of,
                                section)
from experiments.episodic import BATCHING_HELP, BATCHINGS, Setup, Splits

DEFAULT_CACHE = Path.home() / ".cache" / "maml_jax" / "tfds"
def omniglot_splits(data_dir: Optional[str], cache_dir: Optional[str], download: bool,
                    test_alphabets: Sequence[str] = (), val_alphabets: Sequence[str] = ()) -> Splits:
    """Omniglot's splits by alphabet: the evaluation set's alphabets (or with only the minimal zips
    `MINIMAL_TEST_ALPHABETS`, or `test_alphabets`) for test; `val_alphabets` of meta-train for validation."""
    arrays = load_omniglot(data_dir, Path(cache_dir) if cache_dir else DEFAULT_CACHE, download=download)
    names = tuple(test_alphabets)
    if not names:
        names = tuple(sorted(set(arrays["alphabet"][~arrays["background"]].tolist()))) \
            if not arrays["background"].all() else MINIMAL_TEST_ALPHABETS
    train, test = split_by_alphabet(arrays, names)
    val = None
    if val_alphabets:
        clash = sorted(set(val_alphabets) & set(names))
        if clash:
            raise FlagError("--val-alphabets", f"--val-alphabets={','.join(val_alphabets)} includes test "
                            f"alphabets {clash}; expected meta-train alphabets only")
        keep = ~np.isin(arrays["alphabet"], names)
        train, val = split_by_alphabet({k: v[keep] for k, v in arrays.items()}, val_alphabets)
    return Splits(train, val, test, names, "test_alphabets", "characters")


def image_splits(load: Callable[..., dict]) -> Callable[..., Splits]:
    """A `data.images` loader as a `Splits` loader: each split class-major (every class cut to the split's
    smallest class; mini-ImageNet, CIFAR-FS and FC100 have 600 images in each)."""

    def splits(data_dir: Optional[str], cache_dir: Optional[str], download: bool) -> Splits:
        options = {"download": True} if download else {}
        loaded = load(data_dir, Path(cache_dir) if cache_dir else DEFAULT_CACHE, **options)
        (train, _), (val, _), (test, names) = (image_data.class_major(loaded[s]) for s in image_data.SPLITS)
        return Splits(train, val, test, tuple(str(n) for n in names))

    return splits


class Dataset(NamedTuple):
    """A benchmark: how its splits load (`data_dir, cache_dir, download -> Splits`), whether it can download
    missing files, whether rotations are new classes, its images' channels and size, Conv4's filters in its
    papers, and the files it reads."""

    splits: Callable[..., Splits]
    downloads: bool
    rotate: bool
    channels: int
    image_size: int
    filters: int
    files: str


DATASETS = {
    "omniglot": Dataset(omniglot_splits, True, True, 1, IMAGE_SIZE, 64, "the Omniglot zips"),
    "mini_imagenet": Dataset(image_splits(image_data.load_mini_imagenet), False, False, 3, 84, 32,
                             "mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl, or train.csv, val.csv, "
                             "test.csv and images/"),
    "tiered_imagenet": Dataset(image_splits(image_data.load_tiered_imagenet), False, False, 3, 84, 32,
                               "{split}_images_png.pkl and {split}_labels.pkl, or {split}_images.npz and "
                               "{split}_labels.pkl, for train, val and test"),
    "cifar_fs": Dataset(image_splits(image_data.load_cifar_fs), True, False, 3, 32, 32, "cifar-100-python.tar.gz"),
    "fc100": Dataset(image_splits(image_data.load_fc100), True, False, 3, 32, 32, "cifar-100-python.tar.gz"),
}


@dataclass(frozen=True)
class Data(Checked):
    """The benchmark and its N-way K-shot episodes."""

    dataset: str = flag("mini_imagenet", "benchmark: " + ", ".join(DATASETS), rule=one_of(DATASETS))
    data_dir: Optional[str] = flag(None, "folder holding the dataset's files under their usual names (required)")
    cache_dir: Optional[str] = flag(None, f"tfds cache of the built splits (default: {DEFAULT_CACHE})", resumable=True)
    download: bool = flag(False, "download missing files from their public home (Omniglot, CIFAR-100)",
                          resumable=True)
    ways: int = flag(5, "N: classes per task", rule=POSITIVE)
    shots: int = flag(1, "K: support images per class", rule=POSITIVE)
    queries: int = flag(15, "query images per class", rule=at_least(1))

    def __post_init__(self):
        super().__post_init__()
        if self.download and not self.source.downloads:
            raise FlagError("--download", f"--download with --dataset {self.dataset}: it has no public home to "
                            f"download from; expected --data-dir with {self.source.files}")
        if not self.data_dir and not self.download:
            raise FlagError("--data-dir", f"--data-dir is required; expected the folder holding {self.source.files}")

    @property
    def source(self) -> Dataset:
        return DATASETS[self.dataset]

    @property
    def episodes(self) -> evaluation.Episodes:
        return evaluation.Episodes(self.ways, self.shots, self.queries, self.source.rotate)


def _conv4(model: "Model", channels: int, ways: int, image_size: int, key: jax.Array):
    return maml.nn.Conv4(channels, ways, model.filters, image_size, key=key)


def _resnet12(model: "Model", channels: int, ways: int, image_size: int, key: jax.Array):
    return maml.nn.ResNet12(channels, ways, model.widths, key=key)


BACKBONES = {"conv4": _conv4, "resnet12": _resnet12}


@dataclass(frozen=True)
class Model(Checked):
    """The backbone (batch norm with batch statistics) and how a batch of tasks is mapped in the step."""

    backbone: str = flag("conv4", "network: conv4 (Finn et al. 2017) or resnet12 (MetaOptNet's 64-160-320-640)",
                         rule=one_of(BACKBONES))
    filters: Optional[int] = flag(None, "Conv4 filters per layer (default: 64 on Omniglot, 32 on the others, as "
                                        "Finn et al. 2017)", rule=POSITIVE)
    widths: tuple[int, ...] = flag((64, 160, 320, 640), "ResNet-12 block widths (MetaOptNet's; some papers use "
                                   "64,128,256,512)", rule=Rule(lambda v: len(v) == 4 and min(v) >= 1,
                                                                "four positive widths"))
    batching: Optional[str] = flag(None, BATCHING_HELP, rule=one_of(BATCHINGS))

    def build(self, data: Data, key: jax.Array):
        return BACKBONES[self.backbone](self, data.source.channels, data.ways, data.source.image_size, key)


@dataclass(frozen=True)
class Training(Checked):
    """Meta-training, validation and checkpoints."""

    meta_batch: Optional[int] = flag(None, "tasks per meta-iteration (default: Omniglot 32; the others 4 for 1-shot, "
                                           "2 for more shots, as Finn et al. 2017)", rule=POSITIVE)
    iterations: int = flag(60_000, "meta-iterations", rule=POSITIVE, resumable=True)
    max_minutes: Optional[float] = flag(None, "stop training at the first validation after this many minutes",
                                        rule=POSITIVE, resumable=True)
    seed: int = flag(0, "random seed (model init, tasks)", rule=SEED)
    steps_per_call: int = flag(10, "meta-iterations per compiled call (lax.scan)", rule=POSITIVE)
    val_every: int = flag(500, "validate and checkpoint every N meta-iterations", rule=POSITIVE)
    val_tasks: int = flag(100, "validation tasks", rule=POSITIVE, resumable=True)
    skip_nonfinite: int = flag(0, "skip meta-steps with a NaN/inf meta-loss or meta-gradient, up to N in a row "
                                  "(optax.apply_if_finite; counted in results.json); 0: stop the run at the first",
                               rule=at_least(0), absent=0)  # runs from before the flag trained as 0 does


@dataclass(frozen=True)
class Evaluation(Checked):
    """The final evaluation on the test split (and the adaptation at validation)."""

    eval_tasks: int = flag(600, "held-out test tasks of the final evaluation", rule=POSITIVE, resumable=True)


@dataclass(frozen=True)
class FewShotConfig(session.ExperimentConfig):
    """The MAML family on a few-shot image benchmark; defaults are each dataset's papers' (module docstring)."""

    experiment: ClassVar[str] = "fewshot"
    data: Data = section(Data)
    model: Model = section(Model)
    algorithm: A.AlgorithmConfig = algorithm_field()
    training: Training = section(Training)
    evaluation: Evaluation = section(Evaluation)
    out: str = flag("runs/fewshot", "output folder (results.json, validation.jsonl, checkpoints/)", resumable=True)

    def __post_init__(self):  # resolved, so that config.json records the values used
        if self.training.meta_batch is None:
            batch = 32 if self.data.dataset == "omniglot" else (4 if self.data.shots == 1 else 2)
            object.__setattr__(self, "training", dataclasses.replace(self.training, meta_batch=batch))
        if self.model.filters is None:
            object.__setattr__(self, "model", dataclasses.replace(self.model, filters=self.data.source.filters))


CONFIG = FewShotConfig


def omniglot_algorithms(flags) -> dict[str, A.AlgorithmConfig]:
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


def natural_image_algorithms(flags) -> dict[str, A.AlgorithmConfig]:
    """The family on mini-ImageNet and the other natural-image benchmarks: MAML's mini-ImageNet inner loop
    (Finn et al. 2017, sec. 5.2: 5 steps of 0.01, 10 at test) where an algorithm's paper has no settings of
    its own for it (README, "Algorithms")."""
    maml_inner = dict(inner_steps=5, inner_lr=0.01, eval_steps=(10,))
    return A.registry(
        A.MAML(**maml_inner),
        A.FOMAML(**maml_inner),
        A.ANIL(**maml_inner),  # Raghu et al. 2020 keep MAML's settings
        A.MetaSGD(inner_steps=1, eval_steps=(1,)),  # Li et al. 2017, sec. 4.2: one step, rates from [0.005, 0.1]
        # MAML++ (Antoniou et al. 2019): 5 steps with LSLR from MAML's rate, per-step batch norm, MSL and cosine
        # over its release's epochs of 500 iterations (10 and 100)
        A.MAMLPlusPlus(inner_steps=5, inner_lr=0.01, per_step_bn=True, msl_iterations=5000, cosine_iterations=50_000,
                       eval_steps=(5,)),
        # Nichol et al. 2018 (supervised-reptile README, mini-ImageNet): 8 inner iterations, outer step 1 annealed to
        # 0 over 100,000 iterations, evaluation after 50; their inner Adam is SGD of MAML's rate here
        A.Reptile(inner_steps=8, inner_lr=0.01, step_size=1.0, anneal_iterations=100_000, eval_steps=(50,)),
        # Rajeswaran et al. 2019 release no mini-ImageNet settings: their Omniglot ones with MAML's rate
        A.IMAML(inner_steps=16, inner_lr=0.01, lambda_=2.0, cg_steps=5, eval_steps=(16,)),
    )


def algorithms(flags) -> dict[str, A.AlgorithmConfig]:
    """The family with the chosen dataset's defaults."""
    return (omniglot_algorithms if flags["dataset"] == "omniglot" else natural_image_algorithms)(flags)


def setup(config: FewShotConfig) -> Setup:
    return episodic.build(config, lambda key: config.model.build(config.data, key))


def load_splits(data: Data) -> Splits:
    """The splits of `data`, checked to give its episodes."""
    return episodic.checked(data.source.splits(data.data_dir, data.cache_dir, data.download), data.episodes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = tracking.prepare(cli.parse(FewShotConfig, argv, algorithms))
    runtime.initialize(config.runtime)
    built = setup(config)  # everything that can reject the settings runs before anything is written
    return episodic.run_experiment(config, built, load_splits(config.data), job="fewshot")


if __name__ == "__main__":
    cli.run(main)
