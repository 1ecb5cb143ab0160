"""Lake et al.'s one-shot classification benchmark: 20 runs, each a 20-way 1-shot within-alphabet task.

Original layout (a folder, or a zip, possibly under one top folder such as `all_runs/`):
`runNN/training/classMM.png` (the 20 training images, one per class), `runNN/test/itemMM.png` (20 test
items) and `runNN/class_labels.txt`, whose lines pair a test item with its correct training image by
paths from the top folder: `run01/test/item01.png run01/training/class08.png`. Images are 105x105
1-bit PNGs, resized here exactly like the training data (`data.omniglot_files.to_28x28`: uint8, ink 255).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from jaxtyping import Int, UInt8

from data.omniglot_files import to_28x28

_LABELS = re.compile(r"^(?:(.*)/)?(run\d+)/class_labels\.txt$")


class LakeRuns(NamedTuple):
    """`train_images uint8 [R, 20, 28, 28]` (class j of run r at `[r, j]`, in file order class01..),
    `test_images uint8 [R, 20, 28, 28]` (item01..), `test_labels int32 [R, 20]` (the correct class index
    of each test item), `names` (the runs' folder names, e.g. "run01")."""

    train_images: UInt8[np.ndarray, "R N 28 28"]
    test_images: UInt8[np.ndarray, "R T 28 28"]
    test_labels: Int[np.ndarray, "R T"]
    names: tuple[str, ...]


class _Files:
    """Read-only view of a folder or a zip: relative POSIX paths and their bytes."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            self._zip = None
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"lake_runs: {path} is not a readable zip ({e}); expected a folder or a zip of runs")
            self.names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
        self._set = set(self.names)

    def has(self, name: str) -> bool:
        return name in self._set

    def read(self, name: str) -> bytes:
        return self._zip.read(name) if self._zip is not None else (self.path / name).read_bytes()


def _image(files: _Files, name: str) -> UInt8[np.ndarray, "28 28"]:
    try:
        return to_28x28(files.read(name))
    except Exception as e:  # PIL raises several types for a broken PNG
        raise ValueError(f"lake_runs: {files.path}/{name} is not a readable PNG ({type(e).__name__}); expected 105x105")


def _read_run(files: _Files, top: str, run: str):
    prefix = f"{top}/" if top else ""
    root = f"{prefix}{run}/"
    classes = sorted(n for n in files.names if re.fullmatch(re.escape(root) + r"training/class\d+\.png", n))
    items = sorted(n for n in files.names if re.fullmatch(re.escape(root) + r"test/item\d+\.png", n))
    if not classes or not items:
        raise ValueError(
            f"lake_runs: {files.path}/{root} has {len(classes)} training/classNN.png and {len(items)} test/itemNN.png; "
            "expected both"
        )
    labels_file = f"{root}class_labels.txt"
    pairs = [line.split() for line in files.read(labels_file).decode().splitlines() if line.strip()]
    label_of = {}
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(
                f"lake_runs: {labels_file} line {i + 1} is {' '.join(pair)!r}; expected 'TEST_PATH TRAIN_PATH'"
            )
        item, target = (prefix + str(PurePosixPath(p)) for p in pair)
        if item not in items or target not in classes:
            raise ValueError(
                f"lake_runs: {labels_file} line {i + 1} pairs {pair[0]} with {pair[1]}; "
                f"expected a test item and a training image of {run}"
            )
        label_of[item] = classes.index(target)
    unlabelled = [n for n in items if n not in label_of]
    if unlabelled:
        raise ValueError(
            f"lake_runs: {labels_file} gives no label for {unlabelled[0]}; expected one line per test item"
        )
    train = np.stack([_image(files, n) for n in classes])
    test = np.stack([_image(files, n) for n in items])
    return train, test, np.array([label_of[n] for n in items], dtype=np.int32)


def load_lake_runs(path: os.PathLike | str) -> LakeRuns:
    """Read all runs under `path` (a folder or a zip in the original layout) into arrays; see `LakeRuns`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"lake_runs: path={str(path)!r} does not exist; expected a folder or a zip of run01..run20")
    files = _Files(path)
    found = [m.groups() for m in map(_LABELS.match, files.names) if m]
    if not found:
        raise ValueError(f"lake_runs: {path} holds no runNN/class_labels.txt; expected Lake's one-shot runs layout")
    tops = sorted({top or "" for top, _ in found})
    if len(tops) > 1:
        raise ValueError(f"lake_runs: {path} holds runs under several top folders {tops}; expected one")
    runs = sorted(run for _, run in found)
    read = [_read_run(files, tops[0], run) for run in runs]
    shapes = {(r[0].shape[0], r[1].shape[0]) for r in read}
    if len(shapes) != 1:
        raise ValueError(
            f"lake_runs: runs in {path} differ in size (classes, items) {sorted(shapes)}; expected the same for all"
        )
    train, test, labels = (np.stack(parts) for parts in zip(*read))
    return LakeRuns(train, test, labels, tuple(runs))
