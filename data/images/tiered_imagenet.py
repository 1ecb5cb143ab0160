"""tiered-ImageNet (Ren et al. 2018): 351/97/160 classes from 20/6/8 ImageNet categories, 84x84 RGB,
with unequal images per class, from either of the two forms researchers have:

- "png" (Ren et al.'s release, github.com/renmengye/few-shot-ssl-public): `{split}_images_png.pkl`, a
  pickled list of PNG-encoded images (`cv2.imencode` output: uint8 arrays, or byte strings), and
  `{split}_labels.pkl`, a dict with `label_specific int [N]` (the class within the split, 0 .. C-1) and
  usually `label_general`, `label_specific_str`, `label_general_str`. Python 2 pickles.
- "npz" (MetaOptNet's copy, github.com/kjunelee/MetaOptNet data/tiered_imagenet.py; also what Ren et al.'s
  `decompress` writes): `{split}_images.npz` with `images uint8 [N, 84, 84, 3]` and `{split}_labels.pkl`
  with `labels` (MetaOptNet: class ids unique across splits) or Ren et al.'s keys. The arrays are taken as
  stored: Ren et al.'s `decompress` uses `cv2.imdecode`, so an npz made that way is BGR where the PNG form
  decodes (with PIL) to RGB.

Classes are named by `label_specific_str` when present; otherwise by the id ("train/3" in the png form,
whose ids restart in each split; "3" in the npz form). Splits are checked disjoint by category and class
name when the names are there.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple

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
from data.images.files import (
    DatasetError,
    as_text,
    check_not_html,
    check_pickle_complete,
    decode_image,
    fail,
    form_paths,
    get_key,
    load_pickle,
)

DATASET = "tiered_imagenet"
IMAGE_SHAPE = (84, 84, 3)
CLASSES = {"train": 351, "val": 97, "test": 160}  # Ren et al. (2018)
FORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "png": {
        **{f"{s}_images": (f"{s}_images_png.pkl",) for s in SPLITS},
        **{f"{s}_labels": (f"{s}_labels.pkl",) for s in SPLITS},
    },
    "npz": {
        **{f"{s}_images": (f"{s}_images.npz",) for s in SPLITS},
        **{f"{s}_labels": (f"{s}_labels.pkl",) for s in SPLITS},
    },
}
_LABELS = "label_specific (or labels)"
_PNGS = "PNG-encoded images"
_NPZ = "an .npz holding images uint8 [N, 84, 84, 3]"


class Labels(NamedTuple):
    """A labels pickle: `ids int [N]`, and where present the class names (indexed by id), the category
    of each image `general int [N]` and the category names."""

    ids: np.ndarray
    names: list[str] | None
    general: np.ndarray | None
    general_names: list[str] | None


def read_labels(path: Path) -> Labels:
    """A `{split}_labels.pkl`, checked (ids non-negative integers, names covering them)."""
    data = load_pickle(DATASET, path, _LABELS)
    ids = get_key(DATASET, data, "label_specific", path, _LABELS, default=None)
    if ids is None:
        ids = get_key(DATASET, data, "labels", path, _LABELS)
    ids = _ids(path, "label_specific", ids)
    general = get_key(DATASET, data, "label_general", path, _LABELS, default=None)
    general = None if general is None else _ids(path, "label_general", general)
    if general is not None and len(general) != len(ids):
        raise fail(DATASET, f"{path}: label_general has {len(general)} entries; expected {len(ids)}, one per image")
    names = _names(path, "label_specific_str", get_key(DATASET, data, "label_specific_str", path, _LABELS, None), ids)
    general_names = None
    if general is not None:
        value = get_key(DATASET, data, "label_general_str", path, _LABELS, None)
        general_names = _names(path, "label_general_str", value, general)
    return Labels(ids, names, general, general_names)


def _ids(path: Path, key: str, value: object) -> np.ndarray:
    ids = np.asarray(value)
    if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise fail(DATASET, f"{path}: {key} is not a non-empty list of class ids >= 0")
    return ids.astype(np.int64)


def _names(path: Path, key: str, value: object, ids: np.ndarray) -> list[str] | None:
    if value is None:
        return None
    names = [as_text(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else None
    if names is None or len(names) <= ids.max():
        raise fail(DATASET, f"{path}: {key} does not name class {int(ids.max())}; expected a name per class id")
    return names


def prepare_split(split: str, form: str, images: Path, labels_path: Path) -> tuple[PreparedSplit, list[str]]:
    """A checked split and its classes' identities (category/class names, for the disjointness check)."""
    labels = read_labels(labels_path)

    def name(i: int) -> str:
        if labels.names is not None:
            return labels.names[i]
        return f"{split}/{i}" if form == "png" else str(i)

    class_names, index, ids = grouped_split(labels.ids, name)
    if labels.general is not None and labels.general_names is not None:
        first = dict(zip(*(a.tolist() for a in np.unique(labels.ids, return_index=True))))
        identities = [f"{labels.general_names[labels.general[first[c]]]}/{name(c)}" for c in ids]
    else:
        identities = list(class_names)
    count = len(labels.ids)
    source = f"{images} with {labels_path.name}"
    if form == "png":
        check_pickle_complete(DATASET, images, f"a pickle of {_PNGS}")
        prepared = PreparedSplit(class_names, index, lambda: png_images(images, count, labels_path), source)
    else:
        npz_check(images, count, labels_path)
        prepared = PreparedSplit(class_names, index, lambda: npz_images(images, count), source)
    return prepared, identities


def png_images(path: Path, count: int, labels_path: Path) -> Iterator[np.ndarray]:
    """The decoded images `uint8 [84, 84, 3]` (RGB) of a `{split}_images_png.pkl` holding `count`."""
    items = load_pickle(DATASET, path, _PNGS)
    if not isinstance(items, (list, tuple, np.ndarray)):
        raise fail(DATASET, f"{path} holds a {type(items).__name__}; expected a list of {_PNGS}")
    if len(items) != count:
        raise fail(DATASET, f"{path} holds {len(items)} images but {labels_path} has {count} labels")
    for i, item in enumerate(items):
        yield decode_image(DATASET, _png_bytes(path, i, item), f"image {i} of {path}")


def _png_bytes(path: Path, i: int, item: object) -> bytes:
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()  # cv2.imencode gives uint8 [L, 1]
    if isinstance(item, str):  # a Python 2 byte string read with encoding="latin1"
        return item.encode("latin1")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    raise fail(DATASET, f"image {i} of {path} is a {type(item).__name__}; expected PNG bytes")


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def npz_check(path: Path, count: int, labels_path: Path) -> None:
    """Raise unless `path` is an .npz whose `images` is `uint8 [count, 84, 84, 3]` (reads only headers)."""
    check_not_html(DATASET, path, _NPZ)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if "images.npy" not in members:
                arrays = [m.removesuffix(".npy") for m in members]
                raise fail(DATASET, f"{path} has no 'images' array (arrays: {arrays}); expected {_NPZ}")
            with archive.open("images.npy") as f:
                shape, fortran, dtype = _npy_header(f)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise fail(DATASET, f"{path} is truncated or not an .npz ({type(e).__name__}: {e}); expected {_NPZ}") from e
    if tuple(shape[1:]) != IMAGE_SHAPE or dtype != np.uint8 or fortran or len(shape) != 4:
        raise fail(DATASET, f"{path}: images has shape {list(shape)} {dtype}; expected [N, 84, 84, 3] uint8 (C order)")
    if shape[0] != count:
        raise fail(DATASET, f"{path} holds {shape[0]} images but {labels_path} has {count} labels")


def npz_images(path: Path, count: int) -> Iterator[np.ndarray]:
    """The `count` images `uint8 [84, 84, 3]` of a checked .npz, streamed row by row (never all in memory)."""
    size = int(np.prod(IMAGE_SHAPE))
    try:
        with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
            _npy_header(f)
            for i in range(count):
                row = f.read(size)
                if len(row) != size:
                    raise fail(DATASET, f"{path} is truncated: images ends at row {i}; expected {count} rows")
                yield np.frombuffer(row, dtype=np.uint8).reshape(IMAGE_SHAPE)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise fail(DATASET, f"{path} is corrupt ({type(e).__name__}: {e}); expected {_NPZ}") from e


class TieredImageNet(ImageSplitsBuilder, skip_registration=True):
    """tiered-ImageNet from the folder given as `manual_dir`; config "png" or "npz" (the source form).

    Features: `image uint8 [84, 84, 3]`, `label` (index into the split's sorted class names),
    `class_name`, `index` (row in the source). Construct it directly (not registered with tfds).
    """

    name = "maml_tiered_imagenet"
    DATASET = DATASET
    IMAGE_SHAPE = IMAGE_SHAPE
    DESCRIPTION = "tiered-ImageNet (Ren et al. 2018), 351/97/160 classes, 84x84 RGB."
    HOMEPAGE = "https://github.com/renmengye/few-shot-ssl-public"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put {train,val,test}_images_png.pkl (or {train,val,test}_images.npz) and {train,val,test}_labels.pkl "
        "in manual_dir."
    )
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="png", description="from {split}_images_png.pkl + {split}_labels.pkl"),
        tfds.core.BuilderConfig(name="npz", description="from {split}_images.npz + {split}_labels.pkl"),
    ]

    def _prepare(self, manual: Path | None, dl_manager) -> dict[str, PreparedSplit]:
        form = self.builder_config.name
        paths = form_paths(DATASET, manual, form, FORMS[form], FORMS[form]["train_images"][0])
        pairs = {s: prepare_split(s, form, paths[f"{s}_images"], paths[f"{s}_labels"]) for s in SPLITS}
        splits = {s: p for s, (p, _) in pairs.items()}
        check_splits(DATASET, splits, CLASSES, identities={s: ids for s, (_, ids) in pairs.items()})
        return splits


def load_tiered_imagenet(
    data_dir: os.PathLike | str | None, cache_dir: os.PathLike | str, *, form: str | None = None
) -> dict[str, FewShotSplit]:
    """Build (once, cached by tfds in `cache_dir`) and read back tiered-ImageNet: per split "train", "val",
    "test" a `FewShotSplit` (`images uint8 [N, 84, 84, 3]` in source order, `labels int32 [N]`,
    `class_names [C]`). Classes have unequal counts: `class_major` truncates them to the smallest.

    `form` ("png" or "npz") defaults to the one found in `data_dir` (png first); with `data_dir=None`, a
    form already prepared in `cache_dir` is read. The png pickles are read whole (several GB for "train").
    """
    return load_form(DATASET, TieredImageNet, data_dir, cache_dir, FORMS, form)
