"""Omniglot (Lake et al. 2015) through tensorflow-datasets, without TensorFlow.

`OmniglotZips` is a tfds `GeneratorBasedBuilder` (array_record files) that reads the original zips
(`images_background.zip`, `images_evaluation.zip`, `images_background_small1.zip`,
`images_background_small2.zip`) from a folder, or downloads them from their public home, checks their
sha256, and writes each zip as one split of 28x28 uint8 images (resized once; ink = 255, paper = 0).
`load_omniglot` reads the splits back through tfds' data source API, merges them (deduplicating
characters present in several zips) into class-major arrays; `split_by_alphabet` holds alphabets out.

tfds without TensorFlow: `download_and_prepare` with array_record and `as_data_source` work; `tfds.load`,
`as_dataset`/`as_numpy`, archive extraction and tfrecord writing need TensorFlow, and the download
manager only fetches http(s) URLs (other schemes go through `tf.io.gfile`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from jaxtyping import Bool, Int, Shaped, UInt8
from PIL import Image

from data import cache

IMAGE_SIZE = 28
IMAGES_PER_CHARACTER = 20
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# Alphabets held out for meta-test when only the two minimal splits are present (57 of 242 characters).
MINIMAL_TEST_ALPHABETS = ("Korean", "Tagalog")


class ZipInfo(NamedTuple):
    filename: str
    size: int
    sha256: str
    background: bool  # part of the background set (True) or the evaluation set (False)


# Sizes and sha256 as recorded by tensorflow_datasets/url_checksums/omniglot.txt.
ZIPS: dict[str, ZipInfo] = {
    "background": ZipInfo(
        "images_background.zip",
        9464212,
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
        True,
    ),
    "evaluation": ZipInfo(
        "images_evaluation.zip",
        6462886,
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
        False,
    ),
    "small1": ZipInfo(
        "images_background_small1.zip",
        1319022,
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
        True,
    ),
    "small2": ZipInfo(
        "images_background_small2.zip",
        1580917,
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
        True,
    ),
}
_PNG = re.compile(r"^[^/]+/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


def to_28x28(png: bytes | Image.Image) -> UInt8[np.ndarray, "28 28"]:
    """A 105x105 1-bit Omniglot PNG as `uint8 [28, 28]`, ink 255 and paper 0 (Lanczos, as in MAML)."""
    image = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_zip(path: os.PathLike | str, split: str, url: str | None = None) -> Path:
    """Check that `path` (downloaded from `url`, if given) is the published zip of `split`; return it."""
    path, info = Path(path), ZIPS[split]
    if not path.is_file():
        raise ValueError(f"omniglot: {info.filename} not found at {path}; expected the original zip file")
    digest = _sha256(path)
    if digest != info.sha256:
        what = f"{info.filename} downloaded from {url} to {path}" if url else str(path)
        raise ValueError(
            f"omniglot: {what} is corrupt or not the original {info.filename} "
            f"(sha256 {digest}, {path.stat().st_size} bytes; expected sha256 {info.sha256}, {info.size} bytes)"
        )
    return path


def present_splits(data_dir: os.PathLike | str | None) -> tuple[str, ...]:
    """The splits whose zip (under its original name) is in `data_dir`, in `ZIPS` order."""
    if data_dir is None or not Path(data_dir).is_dir():
        return ()
    return tuple(s for s, info in ZIPS.items() if (Path(data_dir) / info.filename).is_file())


@dataclasses.dataclass(eq=False)
class OmniglotConfig(tfds.core.BuilderConfig):
    """Which zips to build, one split each; the config name (and cache folder) is derived from them."""

    splits: tuple[str, ...] = ()


class OmniglotZips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Omniglot from its original zips: one split per zip, 28x28 uint8 images with their labels.

    Features: `image uint8 [28, 28]` (ink 255), `alphabet` (e.g. b"Greek"), `character` (b"character01"),
    `label` (the global character number in the file name), `drawer` (1..20).
    Zips are taken from the download config's `manual_dir`; missing ones are downloaded from `base_url`
    unless it is None. Every zip's sha256 is checked before anything is written. Not registered in tfds'
    global registry (so that re-importing this module is harmless): construct it directly.
    """

    name = "maml_omniglot"
    VERSION = tfds.core.Version("1.0.0")
    disable_shuffling = True  # records stay in zip order; `load_splits` sorts anyway
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put any of " + ", ".join(i.filename for i in ZIPS.values()) + " in manual_dir."
    BUILDER_CONFIGS = [  # one per non-empty subset of the zips, named like "small1-small2"
        OmniglotConfig(name="-".join(subset), splits=subset, description="Omniglot zips: " + ", ".join(subset))
        for size in range(1, len(ZIPS) + 1)
        for subset in itertools.combinations(ZIPS, size)
    ]

    def __init__(self, *, splits: Sequence[str], base_url: str | None = None, **kwargs):
        requested = tuple(splits)
        if not requested or any(s not in ZIPS for s in requested):
            raise ValueError(f"OmniglotZips: splits={requested!r}; expected a non-empty subset of {tuple(ZIPS)}")
        self._base_url = base_url
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config="-".join(s for s in ZIPS if s in requested), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Omniglot handwritten characters, 28x28 uint8 (ink 255), from the original zips.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8),
                    "alphabet": tfds.features.Text(),
                    "character": tfds.features.Text(),
                    "label": np.int32,
                    "drawer": np.int32,
                }
            ),
            homepage="https://github.com/brendenlake/omniglot",
        )

    def _split_generators(self, dl_manager):
        try:
            manual = Path(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # tfds raises AssertionError when manual_dir is absent or empty
            manual = None
        paths, missing = {}, []
        for split in self.builder_config.splits:
            local = manual / ZIPS[split].filename if manual is not None else None
            if local is not None and local.is_file():
                paths[split] = local
            else:
                missing.append(split)
        if missing and self._base_url is None:
            names = ", ".join(ZIPS[s].filename for s in missing)
            where = manual if manual is not None else "manual_dir (none given, or empty)"
            raise ValueError(
                f"omniglot: {names} not found in {where}; expected the original zip files there (or download=True)"
            )
        urls = {s: self._base_url + ZIPS[s].filename for s in missing}
        if urls:
            paths.update({s: Path(p) for s, p in dl_manager.download(urls).items()})
        for split, path in paths.items():
            try:
                verify_zip(path, split, urls.get(split))
            except ValueError:
                if split in missing:  # drop a bad download so that the next try fetches it again
                    path.unlink(missing_ok=True)
                    Path(f"{path}.INFO").unlink(missing_ok=True)
                raise
        return {split: self._generate_examples(paths[split]) for split in self.builder_config.splits}

    def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict]]:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                match = _PNG.match(name)
                if match is None:
                    continue
                alphabet, character, label, drawer = match.groups()
                yield f"{alphabet}/{character}/{drawer}", {
                    "image": to_28x28(archive.read(name)),
                    "alphabet": alphabet,
                    "character": character,
                    "label": int(label),
                    "drawer": int(drawer),
                }


def _data_source_arrays(source) -> dict[str, np.ndarray]:
    """All records of one tfds data source as arrays, sorted by alphabet, character, drawer."""
    indices = range(len(source))
    getitems = getattr(source, "__getitems__", None)  # batched reads; older tfds only has __getitem__
    records = getitems(indices) if getitems is not None else [source[i] for i in indices]
    out = {
        "image": np.stack([r["image"] for r in records]).astype(np.uint8),
        "alphabet": np.array([r["alphabet"].decode() for r in records]),
        "character": np.array([r["character"].decode() for r in records]),
        "label": np.array([r["label"] for r in records], dtype=np.int32),
        "drawer": np.array([r["drawer"] for r in records], dtype=np.int32),
    }
    order = np.lexsort((out["drawer"], out["character"], out["alphabet"]))
    return {k: v[order] for k, v in out.items()}


def load_splits(
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str,
    *,
    splits: Sequence[str] | None = None,
    download: bool = False,
    base_url: str = BASE_URL,
) -> dict[str, dict[str, np.ndarray]]:
    """Build (once, cached by tfds in `cache_dir`; processes sharing it build once, a corrupt one is rebuilt:
    `data.cache`) and read back Omniglot, one dict of arrays per split.

    `splits` defaults to the zips present in `data_dir`, or with `download=True` and none present, to
    ("background", "evaluation"). Per split: `image uint8 [n, 28, 28]`, `alphabet str [n]`,
    `character str [n]` (e.g. "character01"), `label int32 [n]`, `drawer int32 [n]`.
    """
    if data_dir is not None and not Path(data_dir).is_dir() and not download:
        raise ValueError(
            f"omniglot: data_dir={str(data_dir)!r} is not a folder; expected one holding the Omniglot zips"
        )
    if splits is None:
        splits = present_splits(data_dir) or (("background", "evaluation") if download else ())
        if not splits:
            known = ", ".join(i.filename for i in ZIPS.values())
            raise ValueError(f"omniglot: data_dir={str(data_dir)!r} holds none of {known}; expected at least one")
    manual = os.fspath(data_dir) if data_dir is not None and Path(data_dir).is_dir() else None

    def make() -> OmniglotZips:
        return OmniglotZips(splits=splits, base_url=base_url if download else None, data_dir=os.fspath(cache_dir))

    def read(builder: OmniglotZips) -> dict[str, dict[str, np.ndarray]]:
        sources = builder.as_data_source()
        return {split: _data_source_arrays(sources[split]) for split in builder.builder_config.splits}

    return cache.build_and_read(make, tfds.download.DownloadConfig(manual_dir=manual), read, cache_dir=cache_dir,
                                name=OmniglotZips.name, dataset="omniglot")


def merge_splits(per_split: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge splits into class-major arrays, keeping each alphabet/character once (first split wins).

    Returns `images uint8 [C, 20, 28, 28]`, `alphabet str [C]`, `character str [C]` ("Greek/character01"),
    `background bool [C]` (from the background set rather than the evaluation set).
    """
    images, alphabets, characters, background, seen = [], [], [], [], set()
    for split, arrays in per_split.items():
        names = np.char.add(np.char.add(arrays["alphabet"], "/"), arrays["character"])
        for name in dict.fromkeys(names.tolist()):  # unique, order kept
            if name in seen:
                continue
            seen.add(name)
            rows = np.flatnonzero(names == name)
            if len(rows) != IMAGES_PER_CHARACTER:
                raise ValueError(
                    f"omniglot: {name} in split {split!r} has {len(rows)} images; expected {IMAGES_PER_CHARACTER}"
                )
            images.append(arrays["image"][rows])
            alphabets.append(name.split("/")[0])
            characters.append(name)
            background.append(ZIPS[split].background)
    return {
        "images": np.stack(images),
        "alphabet": np.array(alphabets),
        "character": np.array(characters),
        "background": np.array(background, dtype=bool),
    }


def load_omniglot(data_dir: os.PathLike | str | None, cache_dir: os.PathLike | str, **options) -> dict[str, np.ndarray]:
    """`load_splits(data_dir, cache_dir, **options)` then `merge_splits`: class-major
    `images uint8 [C, 20, 28, 28]` with labels.

    With the two minimal zips: 242 characters of 8 alphabets (Greek and Latin, in both, kept once).
    """
    return merge_splits(load_splits(data_dir, cache_dir, **options))


def split_by_alphabet(
    data: dict[str, np.ndarray], test_alphabets: Sequence[str] | None = None
) -> tuple[UInt8[np.ndarray, "Ctrain 20 28 28"], UInt8[np.ndarray, "Ctest 20 28 28"]]:
    """Meta-train and meta-test characters of `load_omniglot`'s output, split by alphabet (never by image).

    `test_alphabets=None`: the standard background / evaluation split when evaluation characters are
    present, else `MINIMAL_TEST_ALPHABETS` held out. Otherwise the named alphabets are held out.
    """
    alphabet: Shaped[np.ndarray, " C"] = data["alphabet"]
    background: Bool[np.ndarray, " C"] = data["background"]
    if test_alphabets is None and not background.all():
        is_test = ~background
    else:
        if isinstance(test_alphabets, str):
            raise ValueError(f"split_by_alphabet: test_alphabets={test_alphabets!r}; expected a sequence of names")
        names = tuple(MINIMAL_TEST_ALPHABETS if test_alphabets is None else test_alphabets)
        available = sorted(set(alphabet.tolist()))
        unknown = [a for a in names if a not in available]
        if unknown or not names:
            raise ValueError(
                f"split_by_alphabet: test_alphabets={names!r} has unknown alphabets {unknown}; "
                f"expected some of {available}"
            )
        is_test = np.isin(alphabet, names)
    if is_test.all():
        raise ValueError(f"split_by_alphabet: test_alphabets={test_alphabets!r} leaves no alphabet for meta-train")
    idx: Int[np.ndarray, " C"] = np.arange(len(alphabet))
    return data["images"][idx[~is_test]], data["images"][idx[is_test]]
