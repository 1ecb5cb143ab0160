"""The few-shot image benchmarks through tensorflow-datasets (no TensorFlow), from the files researchers
actually have: mini-ImageNet, tiered-ImageNet, CIFAR-FS and FC100.

Each benchmark is a tfds `GeneratorBasedBuilder` (array_record files, not registered with tfds) built
from a folder given as `manual_dir`, and a loader that builds it once (tfds caches it in `cache_dir`) and
reads it back through `as_data_source`. Every loader returns the same thing: a dict "train" / "val" /
"test" -> `FewShotSplit(images uint8 [N, H, W, 3], labels int32 [N], class_names [C])`, images in source
order (ragged-safe: tiered-ImageNet's classes have unequal counts). `class_major(split)` turns a split
into `uint8 [C, n, H, W, 3]` for `data.episodes.episode_sampler`, `n` being the smallest class's count
(classes with more images are truncated; mini-ImageNet, CIFAR-FS and FC100 have 600 in every class).

    splits = load_mini_imagenet("~/data/mini-imagenet", "~/tfds")
    images, names = class_major(splits["train"])          # uint8 [64, 600, 84, 84, 3]
    sampler = episode_sampler(images, 5, 1, 15, 4, rotate=False)

Inputs are checked before anything is written (shapes, keys, class counts per split against the published
ones, disjoint splits, HTML pages from failed downloads, truncated files), each failure one `DatasetError`
(a `ValueError`) line naming the file; image-level faults found while writing (an undecodable PNG) leave
nothing behind, since tfds writes into a temporary folder and renames it only when done.

Safety: these datasets are distributed as Python pickles, which are loaded here with `pickle`; a pickle
can run arbitrary code when loaded, so use only trusted copies.
"""

from data.images.cifar import FC100, CifarFS, load_cifar_fs, load_fc100
from data.images.cifar_classes import (
    CIFAR100_FINE_NAMES,
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_SPLITS,
    FC100_SPLITS,
    FC100_SUPERCLASS_SPLITS,
)
from data.images.common import SPLITS, FewShotSplit, class_major
from data.images.files import DatasetError
from data.images.mini_imagenet import MiniImageNet, load_mini_imagenet
from data.images.tiered_imagenet import TieredImageNet, load_tiered_imagenet

__all__ = [
    "CIFAR100_FINE_NAMES",
    "CIFAR100_SUPERCLASSES",
    "CIFAR_FS_SPLITS",
    "FC100",
    "FC100_SPLITS",
    "FC100_SUPERCLASS_SPLITS",
    "SPLITS",
    "CifarFS",
    "DatasetError",
    "FewShotSplit",
    "MiniImageNet",
    "TieredImageNet",
    "class_major",
    "load_cifar_fs",
    "load_fc100",
    "load_mini_imagenet",
    "load_tiered_imagenet",
]
