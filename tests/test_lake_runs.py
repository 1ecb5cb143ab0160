"""Lake et al.'s one-shot runs: fixtures written at test time in the original layout (105x105 1-bit PNGs,
from the real Omniglot images when available, else synthetic strokes), read from a folder and a zip."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.lake_runs import LakeRuns, load_lake_runs
from data.omniglot_files import ZIPS, to_28x28

RUNS, WAYS = 20, 20


def synthetic_characters(count: int, rng: np.random.Generator) -> list[list[bytes]]:
    """`count` characters of 2 drawers each: random strokes (3 per character, jittered per drawer) as PNGs."""
    characters = []
    for _ in range(count):
        strokes = rng.uniform(15, 90, size=(3, 4))
        drawers = []
        for _ in range(2):
            image = Image.new("1", (105, 105), 1)  # white paper, black ink, as in Omniglot
            draw = ImageDraw.Draw(image)
            for stroke in strokes + rng.normal(0, 2, size=strokes.shape):
                draw.line(stroke.tolist(), fill=0, width=3)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            drawers.append(buffer.getvalue())
        characters.append(drawers)
    return characters


def real_characters(count: int, rng: np.random.Generator) -> list[list[bytes]]:
    """`count` characters of one alphabet from the real minimal split, 2 random drawers each (original PNGs)."""
    path = Path(os.environ.get("MAML_SHARED_DATA", "/nonexistent")) / "omniglot" / ZIPS["small1"].filename
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".png") and "/Korean/" in n]  # 40 characters
        by_character: dict[str, list[str]] = {}
        for name in names:
            by_character.setdefault(name.rsplit("/", 1)[0], []).append(name)
        chosen = rng.choice(sorted(by_character), size=count, replace=False)
        return [[archive.read(n) for n in rng.choice(sorted(by_character[c]), 2, replace=False)] for c in chosen]


def write_runs(root: Path, characters, runs: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Write `runs` runs of `len(characters)` classes under `root` in Lake's layout; return the correct class
    index of each test item `[runs, ways]` and the PNG bytes `[(train, test)]` per run."""
    ways = len(characters)
    labels, pngs = np.zeros((runs, ways), np.int32), []
    for r in range(runs):
        run = f"run{r + 1:02d}"
        (root / run / "training").mkdir(parents=True)
        (root / run / "test").mkdir()
        order = rng.permutation(ways)  # test item i shows the character of training class order[i]
        train = [characters[(c + r) % ways][0] for c in range(ways)]
        test = [characters[(order[i] + r) % ways][1] for i in range(ways)]
        lines = []
        for i in range(ways):
            (root / run / "training" / f"class{i + 1:02d}.png").write_bytes(train[i])
            (root / run / "test" / f"item{i + 1:02d}.png").write_bytes(test[i])
            lines.append(f"{run}/test/item{i + 1:02d}.png {run}/training/class{order[i] + 1:02d}.png")
        (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        labels[r], pngs = order, pngs + [(train, test)]
    return labels, pngs


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """20 runs of 20 classes in a folder; real Omniglot images when MAML_SHARED_DATA has them."""
    rng = np.random.default_rng(0)
    real = (Path(os.environ.get("MAML_SHARED_DATA", "/nonexistent")) / "omniglot" / ZIPS["small1"].filename).is_file()
    characters = real_characters(WAYS, rng) if real else synthetic_characters(WAYS, rng)
    root = tmp_path_factory.mktemp("lake") / "all_runs"
    labels, pngs = write_runs(root, characters, RUNS, rng)
    return root, labels, pngs


def test_reads_a_folder(runs_dir):
    root, labels, pngs = runs_dir
    runs = load_lake_runs(root)
    assert isinstance(runs, LakeRuns) and runs.names == tuple(f"run{r:02d}" for r in range(1, 21))
    assert runs.train_images.shape == (RUNS, WAYS, 28, 28) and runs.train_images.dtype == np.uint8
    assert runs.test_images.shape == (RUNS, WAYS, 28, 28) and runs.test_images.dtype == np.uint8
    assert runs.test_labels.shape == (RUNS, WAYS) and runs.test_labels.dtype == np.int32
    np.testing.assert_array_equal(runs.test_labels, labels)
    for r in (0, 13):  # resized exactly like the training data
        np.testing.assert_array_equal(runs.train_images[r, 5], to_28x28(pngs[r][0][5]))
        np.testing.assert_array_equal(runs.test_images[r, 7], to_28x28(pngs[r][1][7]))
    with Image.open(io.BytesIO(pngs[0][0][0])) as im:
        assert im.size == (105, 105) and im.mode == "1"


def test_reads_a_zip_with_a_top_folder(runs_dir, tmp_path):
    root, labels, _ = runs_dir
    path = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(root.rglob("*")):
            archive.write(file, file.relative_to(root.parent).as_posix())
    from_zip, from_folder = load_lake_runs(path), load_lake_runs(root)
    for a, b in zip(from_zip, from_folder):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def small_runs(tmp_path):
    """Two 3-way runs of synthetic characters, for the error cases."""
    rng = np.random.default_rng(1)
    write_runs(tmp_path / "runs", synthetic_characters(3, rng), 2, rng)
    return tmp_path / "runs"


def test_small_runs(small_runs):
    runs = load_lake_runs(small_runs)
    assert runs.train_images.shape == (2, 3, 28, 28) and runs.test_labels.shape == (2, 3)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=r"^lake_runs: path='.*nowhere' does not exist; expected a folder or a zip"):
        load_lake_runs(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no runs here")
    with pytest.raises(ValueError, match=r"holds no runNN/class_labels\.txt; expected Lake's one-shot runs layout"):
        load_lake_runs(tmp_path)
    (tmp_path / "runs.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"runs\.zip is not a readable zip"):
        load_lake_runs(tmp_path / "runs.zip")


def test_label_pointing_nowhere(small_runs):
    labels = small_runs / "run02" / "class_labels.txt"
    labels.write_text(labels.read_text().replace("training/class01.png", "training/class09.png"))
    with pytest.raises(ValueError, match=r"run02/class_labels\.txt line \d pairs .*class09\.png; expected a test item"):
        load_lake_runs(small_runs)


def test_unlabelled_item_and_bad_line(small_runs):
    labels = small_runs / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"gives no label for .*run01/test/item01\.png; expected one line per"):
        load_lake_runs(small_runs)
    labels.write_text("\n".join(["run01/test/item01.png"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"line 1 is 'run01/test/item01\.png'; expected 'TEST_PATH TRAIN_PATH'"):
        load_lake_runs(small_runs)


def test_corrupt_png_and_unequal_runs(small_runs):
    image = small_runs / "run01" / "test" / "item02.png"
    good = image.read_bytes()
    image.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"run01/test/item02\.png is not a readable PNG"):
        load_lake_runs(small_runs)
    image.write_bytes(good)
    (small_runs / "run02" / "test" / "item03.png").unlink()
    labels = small_runs / "run02" / "class_labels.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if "item03" not in line))
    with pytest.raises(ValueError, match=re.escape("differ in size (classes, items) [(3, 2), (3, 3)]")):
        load_lake_runs(small_runs)
