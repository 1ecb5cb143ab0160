"""Omniglot through tensorflow-datasets (no TensorFlow): build, read back, deduplicate, split by alphabet,
download (from a local HTTP server), and one clear error per bad input."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data.omniglot import MINIMAL_TEST_ALPHABETS, load_splits, merge_splits, split_by_alphabet
from data.omniglot_builder import OmniglotZips
from data.omniglot_files import ZIPS, to_28x28


@functools.cache
def _load_once(zips: Path, cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """Build the two minimal splits once per session (tfds caches them under `cache`)."""
    return load_splits(zips, cache)


@pytest.fixture
def omniglot_dir(shared_data) -> Path:
    path = shared_data / "omniglot"
    if not (path / ZIPS["small1"].filename).is_file() or not (path / ZIPS["small2"].filename).is_file():
        pytest.skip(f"real data not available: {path} lacks the minimal Omniglot zips")
    return path


@pytest.fixture
def cache_dir(tmp_path_factory) -> Path:
    """One tfds data_dir per session, shared with tests/test_episodes.py."""
    return tmp_path_factory.getbasetemp() / "omniglot_tfds"


@pytest.fixture
def splits(omniglot_dir, cache_dir):
    return _load_once(omniglot_dir, cache_dir)


# --- the real minimal splits --------------------------------------------------------------------------


def test_builds_both_minimal_splits(splits, cache_dir):
    assert set(splits) == {"small1", "small2"}
    for name, images, alphabets, characters in (("small1", 2720, 5, 136), ("small2", 3120, 5, 156)):
        arrays = splits[name]
        assert arrays["image"].shape == (images, 28, 28) and arrays["image"].dtype == np.uint8
        assert len(set(arrays["alphabet"])) == alphabets
        assert len(set(zip(arrays["alphabet"], arrays["character"]))) == characters
        assert set(arrays["drawer"].tolist()) == set(range(1, 21))
        ink = arrays["image"].astype(np.float32) / 255
        assert ink.max() == 1.0 and 0.02 < ink.mean() < 0.3  # ink is high, paper is 0, strokes are thin
    files = sorted(p.name for p in cache_dir.rglob("*.array_record*"))
    assert any("small1" in f for f in files) and any("small2" in f for f in files)


def test_read_back_matches_the_zip(splits, omniglot_dir):
    arrays = splits["small1"]
    with zipfile.ZipFile(omniglot_dir / ZIPS["small1"].filename) as archive:
        for i in (0, 777, 2719):
            alphabet, character, drawer = arrays["alphabet"][i], arrays["character"][i], arrays["drawer"][i]
            (name,) = [
                n for n in archive.namelist() if f"/{alphabet}/{character}/" in n and n.endswith(f"_{drawer:02d}.png")
            ]
            np.testing.assert_array_equal(arrays["image"][i], to_28x28(archive.read(name)))


def test_dedup_leaves_242_characters_of_8_alphabets(splits):
    data = merge_splits(splits)
    assert data["images"].shape == (242, 20, 28, 28) and data["images"].dtype == np.uint8
    assert len(set(data["alphabet"])) == 8 and len(set(data["character"])) == 242
    assert data["background"].all()
    # Greek and Latin are in both zips with identical images: the copy kept equals the other one.
    small2 = splits["small2"]
    rows = (small2["alphabet"] == "Greek") & (small2["character"] == "character01")
    kept = data["images"][list(data["character"]).index("Greek/character01")]
    np.testing.assert_array_equal(kept, small2["image"][rows])


def test_split_by_alphabet_never_splits_an_alphabet(splits):
    data = merge_splits(splits)
    owner = {data["images"][c].tobytes(): data["alphabet"][c] for c in range(len(data["alphabet"]))}
    for held_out in (None, ("Latin",), ("Greek", "Sanskrit", "Balinese")):
        train, test = split_by_alphabet(data, test_alphabets=held_out)
        expected = set(MINIMAL_TEST_ALPHABETS if held_out is None else held_out)
        train_alphabets = {owner[c.tobytes()] for c in train}
        test_alphabets = {owner[c.tobytes()] for c in test}
        assert test_alphabets == expected and not train_alphabets & test_alphabets
        assert len(train) + len(test) == 242 and train.shape[1:] == (20, 28, 28) and train.dtype == np.uint8
    train, test = split_by_alphabet(data)
    assert (len(train), len(test)) == (185, 57)


def test_standard_split_when_evaluation_is_present():
    image = np.zeros((20, 28, 28), np.uint8)
    data = {
        "images": np.stack([image, image + 1, image + 2]),
        "alphabet": np.array(["A", "B", "C"]),
        "character": np.array(["A/character01", "B/character01", "C/character01"]),
        "background": np.array([True, True, False]),
    }
    train, test = split_by_alphabet(data)
    assert train[:, 0, 0, 0].tolist() == [0, 1] and test[:, 0, 0, 0].tolist() == [2]
    train, test = split_by_alphabet(data, test_alphabets=["A"])
    assert train[:, 0, 0, 0].tolist() == [1, 2] and test[:, 0, 0, 0].tolist() == [0]


def test_cached_build_needs_no_zips(splits, cache_dir):
    files = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.array_record*")}
    again = load_splits(None, cache_dir, splits=("small1", "small2"))
    np.testing.assert_array_equal(again["small2"]["image"], splits["small2"]["image"])
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.array_record*")} == files


def test_download_from_a_local_server(omniglot_dir, http_dir, tmp_path):
    served, url = http_dir
    served["dir"] = omniglot_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    out = load_splits(empty, tmp_path / "cache", splits=["small1"], download=True, base_url=url)
    assert list(out) == ["small1"] and out["small1"]["image"].shape == (2720, 28, 28)


# --- bad input: one clear ValueError line each ----------------------------------------------------------


def test_corrupt_download_is_rejected_and_dropped(http_dir, tmp_path):
    served, url = http_dir
    served["dir"] = tmp_path / "server"
    served["dir"].mkdir()
    (served["dir"] / ZIPS["small2"].filename).write_bytes(b"PK\x03\x04 not really a zip")
    cache = tmp_path / "cache"
    message = r"images_background_small2\.zip downloaded from http:.* is corrupt.*expected sha256 3ccaa407"
    with pytest.raises(ValueError, match=message):
        load_splits(None, cache, splits=["small2"], download=True, base_url=url)
    assert not [p for p in (cache / "downloads").rglob("*.zip")]


def test_corrupt_zip(tmp_path):
    (tmp_path / ZIPS["small1"].filename).write_bytes(b"\x00" * 1000)
    message = r"^omniglot: .*images_background_small1\.zip is corrupt or not the original"
    with pytest.raises(ValueError, match=message) as e:
        load_splits(tmp_path, tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_missing_zip(tmp_path):
    (tmp_path / ZIPS["small1"].filename).write_bytes(b"\x00")  # present, but another split is asked for
    with pytest.raises(ValueError, match=r"images_evaluation\.zip not found in .*; expected the original zip"):
        load_splits(tmp_path, tmp_path / "cache", splits=["evaluation"])


def test_folder_without_known_files(tmp_path):
    (tmp_path / "omniglot.zip").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"holds none of images_background\.zip, .*; expected at least one"):
        load_splits(tmp_path, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"data_dir='.*nowhere' is not a folder"):
        load_splits(tmp_path / "nowhere", tmp_path / "cache")


def test_unknown_split_and_alphabet(tmp_path):
    with pytest.raises(ValueError, match=r"splits=\('small3',\); expected a non-empty subset of"):
        OmniglotZips(splits=["small3"], data_dir=tmp_path)
    data = {
        "images": np.zeros((2, 20, 28, 28), np.uint8),
        "alphabet": np.array(["Greek", "Latin"]),
        "character": np.array(["Greek/character01", "Latin/character01"]),
        "background": np.array([True, True]),
    }
    with pytest.raises(ValueError, match=r"test_alphabets=\('Klingon',\) has unknown alphabets \['Klingon'\]"):
        split_by_alphabet(data, test_alphabets=["Klingon"])
    with pytest.raises(ValueError, match=r"leaves no alphabet for meta-train"):
        split_by_alphabet(data, test_alphabets=["Greek", "Latin"])
    with pytest.raises(ValueError, match=r"test_alphabets='Greek'; expected a sequence"):
        split_by_alphabet(data, test_alphabets="Greek")
