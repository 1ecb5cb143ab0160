"""Omniglot's original files: the four zips (names, sizes and sha256 in `ZIPS`, their public home
`BASE_URL`), checking a zip is the published one (`verify_zip`), which of them a folder holds
(`present_splits`), the PNG names inside them (`PNG_NAME`: alphabet, character, label, drawer), and a
105x105 PNG's 28x28 uint8 form (`to_28x28`: ink 255, paper 0).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jaxtyping import UInt8
from PIL import Image

IMAGE_SIZE = 28
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


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
# A PNG inside a zip: ROOT/ALPHABET/characterNN/LABEL_DRAWER.png
PNG_NAME = re.compile(r"^[^/]+/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


def to_28x28(png: bytes | Image.Image) -> UInt8[np.ndarray, "28 28"]:
    """A 105x105 1-bit Omniglot PNG as `uint8 [28, 28]`, ink 255 and paper 0 (Lanczos, as in MAML)."""
    image = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def file_sha256(path: os.PathLike | str) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB blocks."""
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
    digest = file_sha256(path)
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
