"""Shared pieces of the few-shot image builders: the split records, class-count / disjointness checks, the
tfds builder base, choosing a source form, the array_record readback and the class-major view.

Reading the original files (and the one-line `DatasetError`) is `data.images.files`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from jaxtyping import Int, Shaped, UInt8

from data import cache
from data.images.files import fail, find_form

SPLITS = ("train", "val", "test")


class FewShotSplit(NamedTuple):
    """One split in source order: `images uint8 [N, H, W, 3]`, `labels int32 [N]` indexing
    `class_names str [C]` (sorted; every class has at least one image)."""

    images: UInt8[np.ndarray, "N H W 3"]
    labels: Int[np.ndarray, " N"]
    class_names: Shaped[np.ndarray, " C"]


class PreparedSplit(NamedTuple):
    """A checked split, ready to write: `labels int [N]` into `class_names`, and `images()` yielding the
    N images `uint8 [H, W, 3]` in the same order (decoded lazily, while tfds writes)."""

    class_names: tuple[str, ...]
    labels: np.ndarray
    images: Callable[[], Iterator[np.ndarray]]
    source: str  # the file(s) the split comes from, for messages


# --- split checks ----------------------------------------------------------------------------------------


def grouped_split(
    keys: Sequence[object] | np.ndarray, names: Callable[[object], str] = str
) -> tuple[tuple[str, ...], np.ndarray, list]:
    """Classes from per-image class keys `[N]`: `(class_names [C], labels int32 [N], class_keys [C])`, the
    distinct keys sorted by their name (`names(key)`, ties in order of appearance) and each image's index
    into them."""
    flat = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
    distinct = list(dict.fromkeys(flat))
    ordered = [distinct[i] for i in sorted(range(len(distinct)), key=lambda i: (names(distinct[i]), i))]
    index = {k: j for j, k in enumerate(ordered)}
    return tuple(names(k) for k in ordered), np.array([index[k] for k in flat], dtype=np.int32), ordered


def check_splits(
    dataset: str,
    splits: Mapping[str, PreparedSplit],
    expected_classes: Mapping[str, int],
    identities: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Raise unless each split has its published number of classes, every class has an image, and no class
    (by name, or by `identities[split][c]` where names are not unique identifiers) is in two splits."""
    for split, prepared in splits.items():
        count, expected = len(prepared.class_names), expected_classes[split]
        if count != expected:
            raise fail(
                dataset,
                f"split {split!r} ({prepared.source}) has {count} classes; expected {expected} (the published split)",
            )
        used = np.bincount(prepared.labels, minlength=count) if len(prepared.labels) else np.zeros(count, int)
        if (used == 0).any():
            name = prepared.class_names[int(np.flatnonzero(used == 0)[0])]
            raise fail(dataset, f"class {name!r} of split {split!r} ({prepared.source}) has no images")
    owner: dict[str, str] = {}
    for split, prepared in splits.items():
        for name in identities[split] if identities is not None else prepared.class_names:
            if name in owner and owner[name] != split:
                raise fail(
                    dataset,
                    f"class {name!r} is in both split {owner[name]!r} ({splits[owner[name]].source}) and split "
                    f"{split!r} ({prepared.source}); expected disjoint splits",
                )
            owner[name] = split


# --- tfds ------------------------------------------------------------------------------------------------


class ImageSplitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the few-shot image builders: splits "train", "val", "test" of `image uint8 [H, W, 3]`,
    `label` (int32 index into the split's sorted class names), `class_name`, `index` (position in the
    source). Subclasses implement `_prepare`, which checks every input before anything is written (tfds
    writes into a temporary folder and renames it when done, so a failure while writing leaves nothing)."""

    DATASET: ClassVar[str] = "images"
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]] = (84, 84, 3)
    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    VERSION = tfds.core.Version("1.0.0")
    disable_shuffling = True  # records stay in source order

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": np.int32,
                    "class_name": tfds.features.Text(),
                    "index": np.int32,
                }
            ),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        try:
            manual = Path(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # tfds raises AssertionError when manual_dir is absent or empty
            manual = None
        prepared = self._prepare(manual, dl_manager)
        return {split: self._generate_examples(prepared[split]) for split in SPLITS}

    def _prepare(self, manual: Path | None, dl_manager) -> dict[str, PreparedSplit]:
        raise NotImplementedError

    def _generate_examples(self, prepared: PreparedSplit) -> Iterator[tuple[str, dict]]:
        count = len(prepared.labels)
        i = -1
        for i, image in enumerate(prepared.images()):
            if i >= count:
                raise fail(self.DATASET, f"{prepared.source} has more images than its {count} labels")
            if image.shape != self.IMAGE_SHAPE or image.dtype != np.uint8:
                raise fail(
                    self.DATASET,
                    f"image {i} of {prepared.source} has shape {image.shape} {image.dtype}; "
                    f"expected {list(self.IMAGE_SHAPE)} uint8",
                )
            label = int(prepared.labels[i])
            yield f"{i:09d}", {"image": image, "label": label, "class_name": prepared.class_names[label], "index": i}
        if i + 1 != count:
            raise fail(self.DATASET, f"{prepared.source} has {i + 1} images; expected {count}, one per label")


def read_split(source, image_shape: tuple[int, ...], chunk: int = 2048) -> FewShotSplit:
    """All records of one tfds data source as a `FewShotSplit`, in source order (read in chunks)."""
    n = len(source)
    images = np.empty((n, *image_shape), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int32)
    index = np.empty(n, dtype=np.int64)
    names: dict[int, str] = {}
    getitems = getattr(source, "__getitems__", None)  # batched reads; older tfds only has __getitem__
    for start in range(0, n, chunk):
        rows = range(start, min(n, start + chunk))
        for i, r in zip(rows, getitems(rows) if getitems is not None else [source[j] for j in rows]):
            images[i], labels[i], index[i] = r["image"], r["label"], r["index"]
            names.setdefault(int(r["label"]), r["class_name"].decode())
    order = np.argsort(index, kind="stable")
    class_names = np.array([names[c] for c in range(len(names))]) if names else np.array([], dtype=str)
    return FewShotSplit(images[order], labels[order], class_names)


def build_and_read(builder_cls: type[ImageSplitsBuilder], cache_dir: os.PathLike | str, manual_dir: Path | None,
                   **options: Any) -> dict[str, FewShotSplit]:
    """Prepare `builder_cls(data_dir=cache_dir, **options)` (once: tfds caches it; processes sharing the cache
    build it once, and a corrupt one is rebuilt, see `data.cache`) and read its three splits back."""
    manual = os.fspath(manual_dir) if manual_dir is not None else None

    def make() -> ImageSplitsBuilder:
        return builder_cls(data_dir=os.fspath(cache_dir), **options)

    def read(builder: ImageSplitsBuilder) -> dict[str, FewShotSplit]:
        sources = builder.as_data_source()
        return {split: read_split(sources[split], builder.IMAGE_SHAPE) for split in SPLITS}

    return cache.build_and_read(make, tfds.download.DownloadConfig(manual_dir=manual), read, cache_dir=cache_dir,
                                name=builder_cls.name, dataset=builder_cls.DATASET)


def pick_config(
    dataset: str,
    builder_cls: type[ImageSplitsBuilder],
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    forms: Mapping[str, Mapping[str, Sequence[str]]],
) -> tuple[str, Path | None]:
    """The builder config (source form) to use and the folder to read: the form found in `data_dir`, or
    without one, a form already prepared in `cache_dir`."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise fail(dataset, f"data_dir={str(data_dir)!r} is not a folder; expected one holding the dataset files")
        return find_form(dataset, folder, forms)[0], folder
    for form in forms:
        if builder_cls(config=form, data_dir=os.fspath(cache_dir)).is_prepared():
            return form, None
    raise fail(
        dataset, f"no data_dir given and nothing prepared in {cache_dir}; expected a folder with the dataset files"
    )


def load_form(
    dataset: str,
    builder_cls: type[ImageSplitsBuilder],
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    forms: Mapping[str, Mapping[str, Sequence[str]]],
    form: str | None,
) -> dict[str, FewShotSplit]:
    """Build (once) and read back `builder_cls` from the source `form` (one of `forms`; None: the one found in
    `data_dir`, or with no `data_dir` the one already prepared in `cache_dir`)."""
    if form is not None and form not in forms:
        raise fail(dataset, f"form={form!r}; expected one of {tuple(forms)}")
    chosen = forms if form is None else {form: forms[form]}
    config, folder = pick_config(dataset, builder_cls, data_dir, cache_dir, chosen)
    return build_and_read(builder_cls, cache_dir, folder, config=config)


def class_major(
    split: FewShotSplit, per_class: int | None = None
) -> tuple[UInt8[np.ndarray, "C n H W 3"], Shaped[np.ndarray, " C"]]:
    """Class-major images `uint8 [C, n, H, W, 3]` (for `data.episodes.episode_sampler`) and `class_names [C]`.

    Each class keeps its first `n` images in source order, `n = per_class` or, by default, the smallest
    class's count: classes with more images are truncated (mini-ImageNet, CIFAR-FS and FC100 have 600
    images in every class; tiered-ImageNet's classes vary, so its classes lose images).
    """
    counts = np.bincount(split.labels, minlength=len(split.class_names))
    n = int(counts.min()) if per_class is None else per_class
    if n < 1 or n > counts.min():
        raise ValueError(
            f"class_major: per_class={per_class!r}; expected 1 .. {int(counts.min())} (the smallest class's images)"
        )
    rows = [np.flatnonzero(split.labels == c)[:n] for c in range(len(split.class_names))]
    return split.images[np.stack(rows)], split.class_names
