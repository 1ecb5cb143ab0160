"""mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (2017) split: 64/16/20 classes of 600
84x84 RGB images, from either of the two forms researchers have:

- "pickles": `mini-imagenet-cache-{train,val,test}.pkl` (learn2learn names the middle one
  `mini-imagenet-cache-validation.pkl`; both are accepted), each a dict with `image_data uint8 [N, 84, 84, 3]`
  and `class_dict {wnid: [row indices]}`;
- "jpeg": Ravi & Larochelle's `train.csv`, `val.csv`, `test.csv` (header `filename,label`, label = wnid)
  with an `images/` folder of JPEGs, each resized once to 84x84 with PIL's LANCZOS filter (the filter of
  the common mini-ImageNet generation scripts) at build time; images already 84x84 are kept as decoded.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from data.images.common import (
    SPLITS,
    FewShotSplit,
    ImageSplitsBuilder,
    PreparedSplit,
    check_splits,
    load_form,
    grouped_split,
)
from data.images.files import as_text, check_not_html, decode_image, fail, form_paths, get_key, load_pickle

DATASET = "mini_imagenet"
IMAGE_SIZE = 84
CLASSES = {"train": 64, "val": 16, "test": 20}  # Ravi & Larochelle (2017)
FORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "pickles": {
        "train": ("mini-imagenet-cache-train.pkl",),
        "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
        "test": ("mini-imagenet-cache-test.pkl",),
    },
    "jpeg": {"train": ("train.csv",), "val": ("val.csv",), "test": ("test.csv",), "images": ("images/",)},
}
_PICKLE = "image_data and class_dict"


def read_cache_pickle(path: Path) -> PreparedSplit:
    """One `mini-imagenet-cache-*.pkl`, checked: images in class order (classes sorted by wnid, rows in
    `class_dict` order)."""
    data = load_pickle(DATASET, path, _PICKLE)
    images = get_key(DATASET, data, "image_data", path, _PICKLE)
    class_dict = get_key(DATASET, data, "class_dict", path, _PICKLE)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        what = (
            f"shape {images.shape} {images.dtype}" if isinstance(images, np.ndarray) else f"a {type(images).__name__}"
        )
        raise fail(DATASET, f"{path}: image_data is {what}; expected [N, 84, 84, 3] uint8")
    if not isinstance(class_dict, Mapping) or not class_dict:
        raise fail(DATASET, f"{path}: class_dict is not a non-empty dict; expected {{wnid: [row indices]}}")
    classes = sorted((as_text(k), v) for k, v in class_dict.items())
    rows = [_rows(path, name, v, len(images)) for name, v in classes]
    order = np.concatenate(rows)
    if len(np.unique(order)) != len(order):
        raise fail(DATASET, f"{path}: class_dict lists some rows of image_data under more than one class")
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(r) for r in rows])
    return PreparedSplit(tuple(n for n, _ in classes), labels, lambda: (images[r] for r in order), str(path))


def _rows(path: Path, name: str, value: object, count: int) -> np.ndarray:
    rows = np.asarray(value)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise fail(DATASET, f"{path}: class_dict[{name!r}] is not a list of row indices")
    if rows.size and (rows.min() < 0 or rows.max() >= count):
        raise fail(
            DATASET, f"{path}: class_dict[{name!r}] has row {int(rows.max())}; expected indices in 0 .. {count - 1}"
        )
    return rows.astype(np.int64)


def read_csv_split(path: Path, images_dir: Path) -> PreparedSplit:
    """One split's CSV (`filename,label` rows) and its JPEGs under `images_dir`, in CSV order; every file
    is checked to exist before anything is decoded."""
    check_not_html(DATASET, path, "a CSV with the header filename,label")
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise fail(DATASET, f"{path} is not a CSV ({type(e).__name__}: {e}); expected the header filename,label") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise fail(DATASET, f"{path} starts with {rows[0][:3] if rows else []}; expected the header filename,label")
    body = rows[1:]
    bad = next((i for i, r in enumerate(body) if len(r) != 2 or not r[0].strip() or not r[1].strip()), None)
    if bad is not None:
        raise fail(DATASET, f"{path} line {bad + 2} is {body[bad]}; expected filename,label")
    files = [images_dir / r[0].strip() for r in body]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise fail(
            DATASET,
            f"{images_dir} lacks {len(missing)} of the {len(files)} images listed in {path} (first: {missing[0].name})",
        )
    names, labels, _ = grouped_split([r[1].strip() for r in body])
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return PreparedSplit(names, labels, lambda: (decode_image(DATASET, f, str(f), size) for f in files), str(path))


class MiniImageNet(ImageSplitsBuilder, skip_registration=True):
    """mini-ImageNet from the folder given as `manual_dir`; config "pickles" or "jpeg" (the source form).

    Features: `image uint8 [84, 84, 3]`, `label` (index into the split's sorted wnids), `class_name`
    (the wnid), `index`. Construct it directly (not registered in tfds' global registry).
    """

    name = "maml_mini_imagenet"
    DATASET = DATASET
    IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
    DESCRIPTION = "mini-ImageNet, Ravi & Larochelle split (64/16/20 classes), 84x84 RGB."
    HOMEPAGE = "https://github.com/twitter-research/meta-learning-lstm"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put mini-imagenet-cache-{train,val,test}.pkl, or train.csv, val.csv, test.csv and images/, in manual_dir."
    )
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="pickles", description="from mini-imagenet-cache-*.pkl"),
        tfds.core.BuilderConfig(name="jpeg", description="from the CSV split files and images/ (LANCZOS to 84x84)"),
    ]

    def _prepare(self, manual: Path | None, dl_manager) -> dict[str, PreparedSplit]:
        form = self.builder_config.name
        paths = form_paths(DATASET, manual, form, FORMS[form], ", ".join(FORMS[form]["train"]))
        if form == "pickles":
            splits = {s: read_cache_pickle(paths[s]) for s in SPLITS}
        else:
            splits = {s: read_csv_split(paths[s], paths["images"]) for s in SPLITS}
        check_splits(DATASET, splits, CLASSES)
        return splits


def load_mini_imagenet(
    data_dir: os.PathLike | str | None, cache_dir: os.PathLike | str, *, form: str | None = None
) -> dict[str, FewShotSplit]:
    """Build (once, cached by tfds in `cache_dir`) and read back mini-ImageNet: per split "train", "val",
    "test" a `FewShotSplit` (`images uint8 [N, 84, 84, 3]`, `labels int32 [N]`, `class_names` = wnids [C]).

    `form` ("pickles" or "jpeg") defaults to the one found in `data_dir` (pickles first); with
    `data_dir=None`, a form already prepared in `cache_dir` is read. `class_major` gives `[C, 600, 84, 84, 3]`.
    """
    return load_form(DATASET, MiniImageNet, data_dir, cache_dir, FORMS, form)
