"""CIFAR-FS (Bertinetto et al. 2019: 64/16/20 CIFAR-100 classes) and FC100 (Oreshkin et al. 2018:
12/4/4 superclasses = 60/20/20 classes), both from the standard `cifar-100-python.tar.gz` (or its extracted
`cifar-100-python/` folder), 32x32 RGB.

CIFAR-100's train and test images are pooled (600 per class: train's 500 then test's 100) and re-split by
class with the published lists (`data.images.cifar_classes`). The tarball's pickles (`train`, `test`:
`data uint8 [N, 3072]` channel-major, `fine_labels`; `meta`: `fine_label_names`) are read without extracting
anything. A downloaded tarball (`download=True`) is checked against its published md5 and sha256; a local one
is checked by its content.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.images.cifar_classes import CIFAR_FS_SPLITS, FC100_SPLITS
from data.images.common import (
    SPLITS,
    FewShotSplit,
    ImageSplitsBuilder,
    PreparedSplit,
    build_and_read,
    check_splits,
    grouped_split,
)
from data.images.files import as_text, check_not_html, fail, find_form, get_key, unpickle
from data.omniglot_files import file_sha256

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_TARBALL = "cifar-100-python.tar.gz"
CIFAR100_SIZE = 169001437
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
# As pinned by Keras (keras-team/keras keras/datasets/cifar100.py, `file_hash`) and torchvision
# (pytorch/vision torchvision/prototype/datasets/_builtin/cifar.py, `Cifar100._SHA256`).
CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
FORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "tarball": {"archive": (CIFAR100_TARBALL,)},
    "folder": {m: (f"cifar-100-python/{m}",) for m in ("train", "test", "meta")},
}
IMAGE_SHAPE = (32, 32, 3)


def verify_download(dataset: str, path: Path, url: str) -> Path:
    """Check a downloaded tarball's md5 and sha256 against the published ones; a bad one is deleted."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    sha256 = file_sha256(path)
    if (md5.hexdigest(), sha256) != (CIFAR100_MD5, CIFAR100_SHA256):
        size = path.stat().st_size
        path.unlink(missing_ok=True)  # so that the next try fetches it again
        Path(f"{path}.INFO").unlink(missing_ok=True)
        raise fail(
            dataset,
            f"{CIFAR100_TARBALL} downloaded from {url} to {path} is corrupt or not the original "
            f"(md5 {md5.hexdigest()}, sha256 {sha256}, {size} bytes; expected md5 {CIFAR100_MD5}, "
            f"sha256 {CIFAR100_SHA256}, {CIFAR100_SIZE} bytes)",
        )
    return path


def read_members(dataset: str, form: str, paths: dict[str, Path]) -> dict[str, tuple[bytes, str]]:
    """The `train`, `test` and `meta` pickles' bytes, each with where it came from (for messages)."""
    if form == "folder":
        for m, p in paths.items():
            check_not_html(dataset, p, "a CIFAR-100 python pickle")
        return {m: (p.read_bytes(), str(p)) for m, p in paths.items()}
    path = paths["archive"]
    check_not_html(dataset, path, "the CIFAR-100 python tarball")
    out = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for m in ("train", "test", "meta"):
                name = f"cifar-100-python/{m}"
                try:
                    member = archive.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise fail(dataset, f"{path} has no file {name}; expected the CIFAR-100 python tarball")
                out[m] = (member.read(), f"{path}:{name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise fail(
            dataset, f"{path} is truncated or not a tar.gz ({type(e).__name__}: {e}); expected {CIFAR100_TARBALL}"
        ) from e
    return out


def pooled_images(dataset: str, members: dict[str, tuple[bytes, str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-100's train then test images `uint8 [N, 32, 32, 3]`, fine labels `[N]`, fine names `[100]`."""
    expected = "data and fine_labels"
    images, labels = [], []
    for m in ("train", "test"):
        data, where = members[m]
        batch = unpickle(dataset, data, where, expected)
        x = get_key(dataset, batch, "data", where, expected)
        y = np.asarray(get_key(dataset, batch, "fine_labels", where, expected))
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            what = f"shape {x.shape} {x.dtype}" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
            raise fail(dataset, f"{where}: data is {what}; expected [N, 3072] uint8")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 99)):
            raise fail(dataset, f"{where}: fine_labels is not {len(x)} labels in 0 .. 99, one per image")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y.astype(np.int64))
    data, where = members["meta"]
    meta = unpickle(dataset, data, where, "fine_label_names")
    names = get_key(dataset, meta, "fine_label_names", where, "fine_label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 100:
        raise fail(dataset, f"{where}: fine_label_names is not a list of 100 names")
    return np.concatenate(images), np.concatenate(labels), [as_text(n) for n in names]


def split_by_class(
    images: np.ndarray, labels: np.ndarray, names: list[str], classes: tuple[str, ...], source: str
) -> PreparedSplit:
    """The images of `classes` (by fine name), in pooled order."""
    wanted = np.flatnonzero(np.isin(np.array(names), classes))
    rows = np.flatnonzero(np.isin(labels, wanted))
    class_names, index, _ = grouped_split(labels[rows], lambda c: names[c])
    return PreparedSplit(class_names, index, lambda: iter(images[rows]), source)


class Cifar100Splits(ImageSplitsBuilder, skip_registration=True):
    """Base of `CifarFS` and `FC100`: CIFAR-100 re-split by class (`SPLIT_CLASSES`), 32x32 RGB.

    The tarball (or `cifar-100-python/`) is read from `manual_dir`; without it, downloaded from `url`
    unless that is None. Features: `image uint8 [32, 32, 3]`, `label` (index into the split's sorted
    class names), `class_name` (the fine label name), `index` (position among the pooled images).
    """

    SPLIT_CLASSES: ClassVar[dict[str, tuple[str, ...]]] = {}
    IMAGE_SHAPE = IMAGE_SHAPE
    HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {CIFAR100_TARBALL} (or its extracted cifar-100-python/) in manual_dir."

    def __init__(self, *, url: str | None = None, **kwargs):
        self._url = url
        super().__init__(**kwargs)

    def _prepare(self, manual: Path | None, dl_manager) -> dict[str, PreparedSplit]:
        form, paths = self._source(manual, dl_manager)
        members = read_members(self.DATASET, form, paths)
        images, labels, names = pooled_images(self.DATASET, members)
        source = str(next(iter(paths.values())).parent if form == "folder" else paths["archive"])
        splits = {s: split_by_class(images, labels, names, self.SPLIT_CLASSES[s], source) for s in SPLITS}
        check_splits(self.DATASET, splits, {s: len(c) for s, c in self.SPLIT_CLASSES.items()})
        return splits

    def _source(self, manual: Path | None, dl_manager) -> tuple[str, dict[str, Path]]:
        try:
            if manual is None:
                raise fail(self.DATASET, f"no data folder given (manual_dir); expected one with {CIFAR100_TARBALL}")
            return find_form(self.DATASET, manual, FORMS)
        except ValueError:
            if self._url is None:
                raise
        path = Path(dl_manager.download(self._url))
        return "tarball", {"archive": verify_download(self.DATASET, path, self._url)}


class CifarFS(Cifar100Splits, skip_registration=True):
    """CIFAR-FS: 64/16/20 CIFAR-100 classes (`CIFAR_FS_SPLITS`), 600 32x32 images each."""

    name = "maml_cifar_fs"
    DATASET = "cifar_fs"
    DESCRIPTION = "CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 re-split into 64/16/20 classes, 32x32 RGB."
    SPLIT_CLASSES = CIFAR_FS_SPLITS


class FC100(Cifar100Splits, skip_registration=True):
    """FC100: CIFAR-100 split by superclass, 12/4/4 superclasses = 60/20/20 classes (`FC100_SPLITS`)."""

    name = "maml_fc100"
    DATASET = "fc100"
    DESCRIPTION = "FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass into 60/20/20 classes, 32x32 RGB."
    SPLIT_CLASSES = FC100_SPLITS


def _load(
    builder_cls: type[Cifar100Splits],
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    download: bool,
    url: str,
) -> dict[str, FewShotSplit]:
    dataset = builder_cls.DATASET
    options = {"url": url if download else None}
    builder = builder_cls(data_dir=os.fspath(cache_dir), **options)
    folder = Path(data_dir) if data_dir is not None else None
    if folder is not None and not folder.is_dir():
        if not download:
            raise fail(dataset, f"data_dir={str(data_dir)!r} is not a folder; expected one holding {CIFAR100_TARBALL}")
        folder = None
    if folder is not None and not download and not builder.is_prepared():
        find_form(dataset, folder, FORMS)  # a clear error now, rather than tfds' about an empty manual_dir
    if folder is None and not download and not builder.is_prepared():
        raise fail(dataset, f"no data_dir given and nothing prepared in {cache_dir}; expected {CIFAR100_TARBALL}")
    return build_and_read(builder_cls, cache_dir, folder, **options)


def load_cifar_fs(
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    *,
    download: bool = False,
    url: str = CIFAR100_URL,
) -> dict[str, FewShotSplit]:
    """Build (once, cached by tfds in `cache_dir`) and read back CIFAR-FS: per split "train", "val", "test"
    a `FewShotSplit` (`images uint8 [N, 32, 32, 3]`, `labels int32 [N]`, `class_names` = fine names [C]).

    Reads `cifar-100-python.tar.gz` (or `cifar-100-python/`) from `data_dir`; with `download=True` and
    none there, fetches it from `url` (md5 and sha256 checked). `class_major` gives `[C, 600, 32, 32, 3]`.
    """
    return _load(CifarFS, data_dir, cache_dir, download, url)


def load_fc100(
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    *,
    download: bool = False,
    url: str = CIFAR100_URL,
) -> dict[str, FewShotSplit]:
    """As `load_cifar_fs`, for FC100 (60/20/20 classes of 12/4/4 superclasses)."""
    return _load(FC100, data_dir, cache_dir, download, url)
