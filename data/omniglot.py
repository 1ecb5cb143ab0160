"""Omniglot (Lake et al. 2015) as arrays, through tensorflow-datasets without TensorFlow.

`load_splits` builds the original zips once with the tfds builder `data.omniglot_builder.OmniglotZips`
(cached, `data.cache`) and reads each split back through tfds' data source API; `load_omniglot` merges
them (deduplicating characters present in several zips) into class-major arrays; `split_by_alphabet`
holds alphabets out. The zips themselves (names, sha256, the 28x28 images) are `data.omniglot_files`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from jaxtyping import Bool, Int, Shaped, UInt8

from data import cache
from data.omniglot_builder import OmniglotZips
from data.omniglot_files import BASE_URL, ZIPS, present_splits

IMAGES_PER_CHARACTER = 20
# Alphabets held out for meta-test when only the two minimal splits are present (57 of 242 characters).
MINIMAL_TEST_ALPHABETS = ("Korean", "Tagalog")


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
