"""The few-shot image builders (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100) on small files in each
exact source format: build through tfds, read back, round-trip images and labels, colour episodes, the
in-code split lists, and one clear error line per bad input (nothing half-written left behind)."""

from __future__ import annotations

import functools
import io
import pickle
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from data.episodes import as_images, episode_sampler
from data.images import (
    CIFAR100_FINE_NAMES,
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_SPLITS,
    FC100_SPLITS,
    FC100_SUPERCLASS_SPLITS,
    SPLITS,
    class_major,
    load_cifar_fs,
    load_fc100,
    load_mini_imagenet,
    load_tiered_imagenet,
)
from data.images.files import DatasetError, decode_image

MINI = {"train": 64, "val": 16, "test": 20}
TIERED = {"train": 351, "val": 97, "test": 160}
HTML = b"  \n<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>"


def _image(seed: int, shape=(84, 84, 3)) -> np.ndarray:
    """A smooth (PNG/JPEG-friendly) image, different for every seed."""
    h, w, _ = shape
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 3 + seed * 7) % 256, (y * 3 + seed * 13) % 256, np.full_like(x, seed % 251)], -1)
    return rgb.astype(np.uint8)


def _dump(path: Path, obj, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _message(excinfo, error: type[ValueError] = DatasetError) -> str:
    """The one-line text of an error, checked to be of type `error` (faults of the files: `DatasetError`)."""
    assert type(excinfo.value) is error, type(excinfo.value)
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --- source files in each format -------------------------------------------------------------------------


def _wnids(split: str, count: int) -> list[str]:
    offset = {"train": 1000, "val": 2000, "test": 3000}[split]
    return [f"n{offset + c:08d}" for c in range(count)]


def write_mini_pickles(folder: Path, classes=MINI, per_class: int = 2, val_name="mini-imagenet-cache-val.pkl"):
    """`mini-imagenet-cache-{split}.pkl`; rows of a class are interleaved with other classes' rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, count in classes.items():
        offset = {"train": 0, "val": 3000, "test": 6000}[s]
        images = np.stack([_image(offset + i) for i in range(count * per_class)])
        class_dict = {w: [c + k * count for k in range(per_class)] for c, w in enumerate(_wnids(s, count))}
        name = val_name if s == "val" else f"mini-imagenet-cache-{s}.pkl"
        _dump(folder / name, {"image_data": images, "class_dict": class_dict}, protocol=4)
    return folder


def write_mini_csv(folder: Path):
    """`{split}.csv` + `images/`: one JPEG per class, every other one 96x110 (resized at build time)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for s, count in MINI.items():
        lines = ["filename,label"]
        for c, w in enumerate(_wnids(s, count)):
            name = f"{w}00000001.jpg"
            shape = (84, 84, 3) if c % 2 == 0 else (96, 110, 3)
            Image.fromarray(_image(c, shape)).save(folder / "images" / name, quality=95)
            lines.append(f"{name},{w}")
        (folder / f"{s}.csv").write_text("\n".join(lines) + "\n")
    return folder


def _tiered_labels(split: str) -> np.ndarray:
    """Per-split class ids 0 .. C-1, one image each, plus two more for class 0 and one for class 1."""
    count = TIERED[split]
    return np.concatenate([np.arange(count), [0, 1, 0]]).astype(np.int32)


def _tiered_image(split: str, i: int) -> np.ndarray:
    return _image({"train": 0, "val": 5000, "test": 9000}[split] + i)


def write_tiered_png(folder: Path):
    """Ren et al.'s form: PNGs as `cv2.imencode`-like uint8 [L, 1] arrays, Ren's four label keys (bytes
    keys in "val", as read with `encoding="bytes"`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        labels = _tiered_labels(s)
        pngs = []
        for i in range(len(labels)):
            buf = io.BytesIO()
            Image.fromarray(_tiered_image(s, i)).save(buf, format="PNG", compress_level=1)
            pngs.append(np.frombuffer(buf.getvalue(), np.uint8)[:, None])
        _dump(folder / f"{s}_images_png.pkl", pngs)
        names = [f"{s}-synset-{c}" for c in range(TIERED[s])]
        general_names = [f"{s}-category-{g}" for g in range(8)]
        d = {
            "label_specific": labels,
            "label_general": labels % 8,
            "label_specific_str": names,
            "label_general_str": general_names,
        }
        _dump(folder / f"{s}_labels.pkl", {k.encode(): v for k, v in d.items()} if s == "val" else d)
    return folder


def write_tiered_npz(folder: Path):
    """MetaOptNet's form: `{split}_images.npz` (`images`) + `{split}_labels.pkl` (`labels`, ids unique
    across splits)."""
    folder.mkdir(parents=True, exist_ok=True)
    offset = {"train": 0, "val": 351, "test": 448}
    for s in SPLITS:
        labels = _tiered_labels(s)
        np.savez(folder / f"{s}_images.npz", images=np.stack([_tiered_image(s, i) for i in range(len(labels))]))
        _dump(folder / f"{s}_labels.pkl", {"labels": (labels + offset[s]).tolist()})
    return folder


def _cifar_image(label: int, k: int) -> np.ndarray:
    return _image(label * 10 + k, (32, 32, 3))


def write_cifar_tarball(path: Path, train_per_class=3, test_per_class=1, drop_key=None, drop_class=None,
                        image=_cifar_image) -> Path:
    """A `cifar-100-python.tar.gz` like the real one: channel-major rows, str keys in train/meta and bytes
    keys in test (as `encoding="bytes"` shows Python 2 pickles); `image(label, k) -> uint8 [32, 32, 3]`."""
    members = {}
    for m, per_class, k0, bytes_keys in (("train", train_per_class, 0, False), ("test", test_per_class, 50, True)):
        labels = [c for k in range(per_class) for c in range(100) if c != drop_class]
        ks = [k for k in range(per_class) for c in range(100) if c != drop_class]
        data = np.stack([image(c, k0 + k).transpose(2, 0, 1).reshape(-1) for c, k in zip(labels, ks)])
        batch = {"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels), "filenames": []}
        batch.pop(drop_key, None)
        members[m] = pickle.dumps({k.encode(): v for k, v in batch.items()} if bytes_keys else batch, protocol=2)
    coarse = list(CIFAR100_SUPERCLASSES)
    members["meta"] = pickle.dumps({"fine_label_names": list(CIFAR100_FINE_NAMES), "coarse_label_names": coarse})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for m, data in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{m}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# --- builds shared by several tests (module-scoped) ------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image_data")


@functools.cache
def _built(kind: str, root: Path):
    src, cache = root / f"{kind}-src", root / f"{kind}-cache"
    if kind == "mini-pickles":
        return src, cache, load_mini_imagenet(write_mini_pickles(src), cache)
    if kind == "mini-jpeg":
        return src, cache, load_mini_imagenet(write_mini_csv(src), cache)
    if kind == "tiered-png":
        return src, cache, load_tiered_imagenet(write_tiered_png(src), cache)
    if kind == "tiered-npz":
        return src, cache, load_tiered_imagenet(write_tiered_npz(src), cache)
    write_cifar_tarball(src / "cifar-100-python.tar.gz")
    return src, cache, (load_cifar_fs if kind == "cifar-fs" else load_fc100)(src, cache)


def _check_splits(splits, classes: dict[str, int], shape) -> None:
    assert list(splits) == list(SPLITS)
    for s, split in splits.items():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == shape
        assert split.labels.dtype == np.int32 and split.labels.shape == (len(split.images),)
        assert len(split.class_names) == classes[s] and set(split.labels.tolist()) == set(range(classes[s]))
        assert list(split.class_names) == sorted(split.class_names)
    names = [set(split.class_names.tolist()) for split in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


# --- mini-ImageNet ----------------------------------------------------------------------------------------


def test_mini_imagenet_pickles_round_trip(root):
    src, cache, splits = _built("mini-pickles", root)
    _check_splits(splits, MINI, (84, 84, 3))
    for s in SPLITS:
        data = pickle.loads((src / f"mini-imagenet-cache-{s}.pkl").read_bytes())
        images, names = class_major(splits[s])
        assert images.shape == (MINI[s], 2, 84, 84, 3) and list(names) == sorted(data["class_dict"])
        for c, wnid in enumerate(names):
            np.testing.assert_array_equal(images[c], data["image_data"][data["class_dict"][wnid]])
    assert any(cache.rglob("*.array_record*"))


def test_mini_imagenet_colour_episodes(root):
    _, _, splits = _built("mini-pickles", root)
    images, _ = class_major(splits["train"])
    source = {im.tobytes() for im in images.reshape(-1, 84, 84, 3)}
    for rotate in (False, True):
        tasks = jax.jit(lambda k, s: s(k))(jax.random.key(0), episode_sampler(images, 5, 1, 1, 3, rotate=rotate))
        assert tasks.support_x.shape == (3, 5, 84, 84, 3) and tasks.query_x.shape == (3, 5, 84, 84, 3)
        assert tasks.support_y.shape == (3, 5) and tasks.support_x.dtype == np.float32
        drawn = np.asarray(as_images(np.concatenate([tasks.support_x, tasks.query_x], 1))).reshape(-1, 84, 84, 3)
        if not rotate:
            assert {im.tobytes() for im in drawn} <= source
        else:
            rotations = {np.rot90(im, r).tobytes() for im in images.reshape(-1, 84, 84, 3) for r in range(4)}
            assert {im.tobytes() for im in drawn} <= rotations


def test_mini_imagenet_csv_and_jpegs(root):
    src, _, splits = _built("mini-jpeg", root)
    _check_splits(splits, MINI, (84, 84, 3))
    train = splits["train"]
    for c in (0, 1):  # 84x84 kept as decoded; 96x110 resized with LANCZOS
        f = src / "images" / f"{_wnids('train', 64)[c]}00000001.jpg"
        decoded = np.asarray(Image.open(f).convert("RGB"))
        expected = (
            decoded if c == 0 else np.asarray(Image.open(f).convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))
        )
        np.testing.assert_array_equal(train.images[list(train.class_names).index(_wnids("train", 64)[c])], expected)
        np.testing.assert_array_equal(decode_image("t", f, "f", (84, 84)), expected)


def test_learn2learn_validation_name_and_cached_read(tmp_path):
    src = write_mini_pickles(tmp_path / "src", val_name="mini-imagenet-cache-validation.pkl")
    first = load_mini_imagenet(src, tmp_path / "cache")
    again = load_mini_imagenet(None, tmp_path / "cache")  # no data folder: the prepared form is read
    np.testing.assert_array_equal(first["val"].images, again["val"].images)


# --- tiered-ImageNet --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiered-png", "tiered-npz"])
def test_tiered_imagenet_round_trip_and_min_count(root, kind):
    _, _, splits = _built(kind, root)
    _check_splits(splits, TIERED, (84, 84, 3))
    for s in SPLITS:
        split, ids = splits[s], _tiered_labels(s)
        np.testing.assert_array_equal(split.images, np.stack([_tiered_image(s, i) for i in range(len(ids))]))
        if kind == "tiered-png":
            np.testing.assert_array_equal(split.class_names[split.labels], [f"{s}-synset-{c}" for c in ids])
        images, names = class_major(split)  # class 0 has 3 images, class 1 two, the rest one: truncated to 1
        assert images.shape == (TIERED[s], 1, 84, 84, 3) and len(names) == TIERED[s]
        first = class_major(split, per_class=1)[0]
        np.testing.assert_array_equal(images, first)
    with pytest.raises(ValueError, match=r"per_class=2; expected 1 \.\. 1") as e:
        class_major(splits["train"], per_class=2)
    _message(e, ValueError)


def test_tiered_names_by_id_without_strings(root):
    _, _, splits = _built("tiered-npz", root)
    assert splits["val"].class_names[0] == "351" and splits["test"].class_names[-1] == "607"


# --- CIFAR-FS and FC100 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, lists", [("cifar-fs", CIFAR_FS_SPLITS), ("fc100", FC100_SPLITS)])
def test_cifar_splits_round_trip(root, kind, lists):
    _, _, splits = _built(kind, root)
    _check_splits(splits, {s: len(c) for s, c in lists.items()}, (32, 32, 3))
    for s in SPLITS:
        assert set(splits[s].class_names.tolist()) == set(lists[s])
        images, names = class_major(splits[s])
        assert images.shape == (len(lists[s]), 4, 32, 32, 3)  # train's 3 then test's 1
        for c, name in enumerate(names):
            label = CIFAR100_FINE_NAMES.index(name)
            expected = [_cifar_image(label, k) for k in (0, 1, 2, 50)]
            np.testing.assert_array_equal(images[c], np.stack(expected))
    tasks = episode_sampler(class_major(splits["test"])[0], 5, 1, 3, 2, rotate=False)(jax.random.key(1))
    assert tasks.support_x.shape == (2, 5, 32, 32, 3) and tasks.query_x.shape == (2, 15, 32, 32, 3)


def test_cifar_extracted_folder(tmp_path):
    tarball = write_cifar_tarball(tmp_path / "t" / "cifar-100-python.tar.gz")
    with tarfile.open(tarball) as archive:
        archive.extractall(tmp_path / "src", filter="data")
    splits = load_fc100(tmp_path / "src", tmp_path / "cache")
    assert len(splits["val"].class_names) == 20


def test_split_lists_are_the_published_ones():
    assert len(CIFAR100_FINE_NAMES) == len(set(CIFAR100_FINE_NAMES)) == 100
    assert sorted(CIFAR100_FINE_NAMES) == list(CIFAR100_FINE_NAMES)  # meta's order is alphabetical
    supers = [f for fines in CIFAR100_SUPERCLASSES.values() for f in fines]
    assert len(CIFAR100_SUPERCLASSES) == 20 and sorted(supers) == sorted(CIFAR100_FINE_NAMES)
    assert {len(f) for f in CIFAR100_SUPERCLASSES.values()} == {5}
    coarse = [c for s in SPLITS for c in FC100_SUPERCLASS_SPLITS[s]]
    assert [len(FC100_SUPERCLASS_SPLITS[s]) for s in SPLITS] == [12, 4, 4]
    assert sorted(coarse) == sorted(CIFAR100_SUPERCLASSES)
    for lists, counts in ((CIFAR_FS_SPLITS, [64, 16, 20]), (FC100_SPLITS, [60, 20, 20])):
        assert [len(lists[s]) for s in SPLITS] == counts and [len(set(lists[s])) for s in SPLITS] == counts
        every = [c for s in SPLITS for c in lists[s]]
        assert len(set(every)) == 100 and set(every) == set(CIFAR100_FINE_NAMES)


# --- bad input: one ValueError line each, before anything is written ------------------------------------


def _no_dataset_written(cache: Path) -> None:
    assert not list(cache.rglob("*.array_record*")) and not list(cache.rglob("dataset_info.json"))
    assert not [p for p in cache.rglob("*") if "incomplete" in p.name]


def test_html_instead_of_pickle_or_tarball(tmp_path):
    src = write_mini_pickles(tmp_path / "mini")
    (src / "mini-imagenet-cache-train.pkl").write_bytes(HTML)
    with pytest.raises(ValueError) as e:
        load_mini_imagenet(src, tmp_path / "cache")
    assert _message(e) == (
        f"mini_imagenet: {src / 'mini-imagenet-cache-train.pkl'} is an HTML page (a failed download?), "
        "not a pickle of image_data and class_dict"
    )
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-100-python.tar.gz").write_bytes(HTML.upper())
    with pytest.raises(ValueError, match=r"^cifar_fs: .*cifar-100-python\.tar\.gz is an HTML page") as e:
        load_cifar_fs(tmp_path / "cifar", tmp_path / "cache")
    _message(e)
    _no_dataset_written(tmp_path / "cache")


def test_truncated_files(tmp_path):
    src = write_mini_pickles(tmp_path / "mini")
    path = src / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"^mini_imagenet: .*mini-imagenet-cache-val\.pkl is truncated or not") as e:
        load_mini_imagenet(src, tmp_path / "cache")
    _message(e)
    tarball = write_cifar_tarball(tmp_path / "cifar" / "cifar-100-python.tar.gz")
    tarball.write_bytes(tarball.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"^fc100: .*cifar-100-python\.tar\.gz is truncated or not a tar\.gz") as e:
        load_fc100(tarball.parent, tmp_path / "cache")
    _message(e)
    tiered = write_tiered_png(tmp_path / "tiered")
    labels = tiered / "test_labels.pkl"
    labels.write_bytes(labels.read_bytes()[:-1] + b"x")  # does not end like a pickle
    with pytest.raises(ValueError, match=r"test_labels\.pkl is truncated or not a pickle") as e:
        load_tiered_imagenet(tiered, tmp_path / "cache")
    _message(e)
    _no_dataset_written(tmp_path / "cache")


def test_wrong_shapes_keys_and_indices(tmp_path):
    src = write_mini_pickles(tmp_path / "mini")
    path = src / "mini-imagenet-cache-test.pkl"
    data = pickle.loads(path.read_bytes())
    _dump(path, {"image_data": data["image_data"][:, :32, :32], "class_dict": data["class_dict"]})
    with pytest.raises(
        ValueError, match=r"image_data is shape \(40, 32, 32, 3\) uint8; expected \[N, 84, 84, 3\]"
    ) as e:
        load_mini_imagenet(src, tmp_path / "cache")
    assert str(path) in _message(e)
    data["class_dict"][next(iter(data["class_dict"]))] = [0, 40]
    _dump(path, data)
    with pytest.raises(ValueError, match=r"has row 40; expected indices in 0 \.\. 39") as e:
        load_mini_imagenet(src, tmp_path / "cache")
    _message(e)
    _dump(path, {"image_data": data["image_data"]})
    with pytest.raises(ValueError, match=r"has no 'class_dict' key \(keys: \['image_data'\]\)") as e:
        load_mini_imagenet(src, tmp_path / "cache")
    _message(e)
    tarball = write_cifar_tarball(tmp_path / "cifar" / "cifar-100-python.tar.gz", drop_key="fine_labels")
    with pytest.raises(ValueError, match=r"cifar-100-python/train has no 'fine_labels' key") as e:
        load_cifar_fs(tarball.parent, tmp_path / "cache")
    _message(e)
    npz = write_tiered_npz(tmp_path / "npz")
    np.savez(npz / "val_images.npz", images=np.zeros((5, 84, 84), np.uint8))
    with pytest.raises(ValueError, match=r"val_images\.npz: images has shape \[5, 84, 84\] uint8; expected") as e:
        load_tiered_imagenet(npz, tmp_path / "cache")
    _message(e)
    np.savez(npz / "val_images.npz", pixels=np.zeros((5, 84, 84, 3), np.uint8))
    with pytest.raises(ValueError, match=r"val_images\.npz has no 'images' array \(arrays: \['pixels'\]\)") as e:
        load_tiered_imagenet(npz, tmp_path / "cache")
    _message(e)
    _no_dataset_written(tmp_path / "cache")


def test_class_counts_must_be_the_published_ones(tmp_path):
    src = write_mini_pickles(tmp_path / "mini", classes={"train": 64, "val": 15, "test": 20})
    with pytest.raises(ValueError, match=r"^mini_imagenet: split 'val' \(.*\) has 15 classes; expected 16") as e:
        load_mini_imagenet(src, tmp_path / "cache")
    assert "mini-imagenet-cache-val.pkl" in _message(e)
    tarball = write_cifar_tarball(tmp_path / "cifar" / "cifar-100-python.tar.gz", drop_class=0)  # "apple"
    with pytest.raises(ValueError, match=r"^fc100: split 'train' \(.*\) has 59 classes; expected 60") as e:
        load_fc100(tarball.parent, tmp_path / "cache")
    _message(e)
    tiered = write_tiered_npz(tmp_path / "tiered")
    labels = np.concatenate([np.arange(351, 447), [351] * 4])  # 96 classes, 100 images
    _dump(tiered / "val_labels.pkl", {"labels": labels})
    with pytest.raises(ValueError, match=r"split 'val' \(.*val_images\.npz.*\) has 96 classes; expected 97") as e:
        load_tiered_imagenet(tiered, tmp_path / "cache")
    _message(e)
    _no_dataset_written(tmp_path / "cache")


def test_a_class_in_two_splits(tmp_path):
    src = write_mini_pickles(tmp_path / "mini")
    path = src / "mini-imagenet-cache-val.pkl"
    data = pickle.loads(path.read_bytes())
    first = next(iter(data["class_dict"]))
    data["class_dict"][_wnids("train", 64)[5]] = data["class_dict"].pop(first)
    _dump(path, data)
    with pytest.raises(ValueError, match=r"class 'n00001005' is in both split 'train' \(.*\) and split 'val'") as e:
        load_mini_imagenet(src, tmp_path / "cache")
    _message(e)
    tiered = write_tiered_npz(tmp_path / "tiered")
    _dump(tiered / "test_labels.pkl", {"labels": np.concatenate([np.arange(448, 607), [3, 448, 448, 448]])})
    with pytest.raises(ValueError, match=r"class '3' is in both split 'train'") as e:
        load_tiered_imagenet(tiered, tmp_path / "cache")
    _message(e)
    _no_dataset_written(tmp_path / "cache")


def test_folders_without_the_known_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    cache = tmp_path / "cache"
    cases = [
        (load_mini_imagenet, r"mini-imagenet-cache-train\.pkl, mini-imagenet-cache-val\.pkl, .* or train\.csv, "),
        (load_tiered_imagenet, r"train_images_png\.pkl, .*test_labels\.pkl or train_images\.npz"),
        (load_cifar_fs, r"cifar-100-python\.tar\.gz or cifar-100-python/train, cifar-100-python/test"),
        (load_fc100, r"cifar-100-python\.tar\.gz or "),
    ]
    for load, expected in cases:
        with pytest.raises(ValueError, match=r"holds none of the known files; expected " + expected) as e:
            load(tmp_path / "x", cache)
        assert str(tmp_path / "x") in _message(e)
    write_mini_pickles(tmp_path / "x", classes={"train": 64})
    with pytest.raises(ValueError, match=r"holds mini-imagenet-cache-train\.pkl but not mini-imagenet-cache-val") as e:
        load_mini_imagenet(tmp_path / "x", cache)
    _message(e)
    with pytest.raises(ValueError, match=r"^mini_imagenet: no data_dir given and nothing prepared in"):
        load_mini_imagenet(None, cache)
    with pytest.raises(ValueError, match=r"^cifar_fs: data_dir='.*nowhere' is not a folder"):
        load_cifar_fs(tmp_path / "nowhere", cache)
    _no_dataset_written(cache)


def test_failed_build_leaves_nothing_and_a_rebuild_succeeds(tmp_path):
    """A fault found only while tfds writes (an undecodable PNG): tfds' temporary folder is removed, so a
    second build with good files starts clean and succeeds."""
    src, cache = write_tiered_png(tmp_path / "src"), tmp_path / "cache"
    good = (src / "test_images_png.pkl").read_bytes()
    pngs = pickle.loads(good)
    pngs[7] = np.frombuffer(b"\x89PNG not really", np.uint8)
    _dump(src / "test_images_png.pkl", pngs)
    with pytest.raises(ValueError, match=r"^tiered_imagenet: image 7 of .*test_images_png\.pkl is not a readable") as e:
        load_tiered_imagenet(src, cache)
    _message(e)
    _no_dataset_written(cache)
    assert not (cache / "maml_tiered_imagenet" / "png" / "1.0.0").exists()  # train and val were written, then removed
    (src / "test_images_png.pkl").write_bytes(good)
    splits = load_tiered_imagenet(src, cache)
    assert len(splits["test"].images) == 163


def test_download_with_a_wrong_checksum_is_rejected_and_dropped(http_dir, tmp_path):
    served, url = http_dir
    served["dir"] = write_cifar_tarball(tmp_path / "server" / "cifar-100-python.tar.gz").parent
    cache = tmp_path / "cache"
    with pytest.raises(
        ValueError, match=r"^cifar_fs: cifar-100-python\.tar\.gz downloaded from http:.* is corrupt"
    ) as e:
        load_cifar_fs(None, cache, download=True, url=url + "cifar-100-python.tar.gz")
    assert "expected md5 eb9058c3a382ffc7106e4002c42a8d85" in _message(e)
    assert not list((cache / "downloads").rglob("*.tar.gz*"))
    _no_dataset_written(cache)
