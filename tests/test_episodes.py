"""On-device N-way K-shot episodes: shapes, dtypes, labels, rotations as classes, fold_in per task, jit,
errors, and (on the real data) no mixing of meta-train and meta-test alphabets."""

from __future__ import annotations

import functools
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.episodes import as_images, episode_sampler, sample_episode, sample_episodes
from data.omniglot import load_splits, merge_splits, split_by_alphabet
from data.omniglot_files import ZIPS
from maml import Task, check_batch

CHARS = 10
WAYS, SHOTS, QUERIES, TASKS = 5, 2, 3, 16


@pytest.fixture(scope="module")
def coded_images() -> np.ndarray:
    """`uint8 [10, 20, 28, 28]`: image (c, d) is filled with 20 * c + d + 1 and has 255 in its top-left
    corner, so an episode image tells its character, drawer and rotation."""
    c, d = np.meshgrid(np.arange(CHARS), np.arange(20), indexing="ij")
    images = np.broadcast_to((20 * c + d + 1)[..., None, None], (CHARS, 20, 28, 28)).astype(np.uint8).copy()
    images[:, :, 0, 0] = 255
    return images


draw = eqx.filter_jit(lambda sampler, key: sampler(key))  # the sampler is an argument: its images are not constants


@pytest.fixture(scope="module")
def batch(coded_images) -> Task:
    return draw(episode_sampler(coded_images, WAYS, SHOTS, QUERIES, TASKS), jax.random.key(0))


def test_shapes_dtypes_and_labels(batch):
    assert check_batch(batch) == TASKS
    assert batch.support_x.shape == (TASKS, WAYS * SHOTS, 28, 28, 1) and batch.support_x.dtype == jnp.float32
    assert batch.query_x.shape == (TASKS, WAYS * QUERIES, 28, 28, 1) and batch.query_x.dtype == jnp.float32
    assert batch.support_y.dtype == jnp.int32 and batch.query_y.dtype == jnp.int32
    np.testing.assert_array_equal(batch.support_y, np.broadcast_to(np.repeat(np.arange(WAYS), SHOTS), (TASKS, 10)))
    np.testing.assert_array_equal(batch.query_y, np.broadcast_to(np.repeat(np.arange(WAYS), QUERIES), (TASKS, 15)))
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) == 1.0


def test_classes_are_characters_times_rotations(batch, coded_images):
    x = jnp.concatenate([batch.support_x, batch.query_x], axis=1)
    y = np.concatenate([batch.support_y, batch.query_y], axis=1)
    u8 = np.asarray(as_images(x))
    char = (u8[..., 14, 14].astype(int) - 1) // 20
    drawer = (u8[..., 14, 14].astype(int) - 1) % 20
    corner = np.argmax(np.stack([u8[..., 0, 0], u8[..., -1, 0], u8[..., -1, -1], u8[..., 0, -1]], -1) == 255, -1)
    for t in range(TASKS):
        classes = set()
        for j in range(WAYS):
            rows = y[t] == j
            assert len(set(char[t, rows])) == 1 and len(set(corner[t, rows])) == 1  # one character, one rotation
            classes.add((char[t, rows][0], corner[t, rows][0]))
        assert len(classes) == WAYS  # distinct classes (a character may recur under another rotation)
    # the images of a class are distinct drawers, so support and query never share an image
    for t in range(TASKS):
        for j in range(WAYS):
            assert len(set(drawer[t, y[t] == j].tolist())) == SHOTS + QUERIES
    assert set(corner.ravel().tolist()) == {0, 1, 2, 3}  # all four rotations are drawn
    np.testing.assert_array_equal(u8[0, 0], np.rot90(coded_images[char[0, 0], drawer[0, 0]], corner[0, 0]))


def test_task_i_comes_from_fold_in(coded_images, batch):
    key = jax.random.key(0)
    one = jax.jit(lambda k, im: sample_episode(k, im, WAYS, SHOTS, QUERIES))
    for i in (0, 7, TASKS - 1):
        task = one(jax.random.fold_in(key, i), jnp.asarray(coded_images))
        np.testing.assert_array_equal(task.support_x, batch.support_x[i])
        np.testing.assert_array_equal(task.query_x, batch.query_x[i])
    other = draw(episode_sampler(coded_images, WAYS, SHOTS, QUERIES, TASKS), jax.random.key(1))
    assert not np.array_equal(other.support_x, batch.support_x)


def test_sample_range_halves_make_the_whole_batch(coded_images, batch):
    """`maml.parallel`'s sampler protocol: two halves drawn separately (a traced start, as on each device)
    are the whole batch, task for task."""
    sampler = episode_sampler(coded_images, WAYS, SHOTS, QUERIES, TASKS)
    assert sampler.num_tasks == TASKS
    half = TASKS // 2
    part = eqx.filter_jit(lambda s, k, start: s.sample_range(k, start, half))
    key = jax.random.key(0)
    halves = [part(sampler, key, jnp.int32(start)) for start in (0, half)]
    for whole, first, second in zip(jax.tree.leaves(batch), *(jax.tree.leaves(h) for h in halves)):
        assert first.shape[0] == second.shape[0] == half
        np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    assert not np.array_equal(halves[0].support_x, halves[1].support_x)


def test_without_rotations_and_inside_a_scan(coded_images):
    sampler = episode_sampler(coded_images, CHARS, 1, 19, 3, rotate=False)

    def body(key, _):
        key, sub = jax.random.split(key)
        task = sampler(sub)
        return key, (task.support_x, task.query_x)

    _, (support, query) = jax.jit(lambda k: jax.lax.scan(body, k, None, length=2))(jax.random.key(3))
    assert support.shape == (2, 3, CHARS, 28, 28, 1) and query.shape == (2, 3, CHARS * 19, 28, 28, 1)
    u8 = np.asarray(as_images(support))
    assert (u8[..., 0, 0] == 255).all()  # never rotated
    assert sorted(((u8[0, 0, :, 14, 14].astype(int) - 1) // 20).tolist()) == list(range(CHARS))  # all characters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ways=41), r"ways=41 is more than the split's 40 classes \(10 characters x 4 rotations\)"),
        (dict(ways=11, rotate=False), r"ways=11 is more than the split's 10 classes \(10 classes, no rotations\)"),
        (dict(shots=5, queries=16), r"shots \+ queries = 5 \+ 16 = 21; expected at most 20 images per character"),
        (dict(shots=0), r"shots=0; expected an integer >= 1"),
        (dict(num_tasks=0), r"num_tasks=0; expected an integer >= 1"),
    ],
)
def test_bad_arguments(coded_images, kwargs, message):
    args = dict(ways=5, shots=1, queries=15, num_tasks=2) | kwargs
    rotate = args.pop("rotate", True)
    with pytest.raises(ValueError, match=r"^episodes: " + message):
        episode_sampler(coded_images, args["ways"], args["shots"], args["queries"], args["num_tasks"], rotate=rotate)
    with pytest.raises(ValueError, match=message):
        sample_episodes(jax.random.key(0), jnp.asarray(coded_images), **args, rotate=rotate)


def test_images_must_be_class_major(coded_images):
    with pytest.raises(ValueError, match=r"images has shape \(200, 28, 28\); expected \[characters, images"):
        episode_sampler(coded_images.reshape(200, 28, 28), 5, 1, 1, 1)


# --- real data: episodes never mix meta-train and meta-test alphabets -----------------------------------


@functools.cache
def _load_once(zips: Path, cache: Path):
    return merge_splits(load_splits(zips, cache))


def test_real_episodes_stay_in_their_split(shared_data, tmp_path_factory):
    zips = shared_data / "omniglot"
    if not all((zips / ZIPS[s].filename).is_file() for s in ("small1", "small2")):
        pytest.skip(f"real data not available: {zips} lacks the minimal Omniglot zips")
    data = _load_once(zips, tmp_path_factory.getbasetemp() / "omniglot_tfds")  # shared with test_omniglot_data
    train, test = split_by_alphabet(data, test_alphabets=("Korean", "Tagalog"))

    def rotations(images):
        return {np.rot90(im, r).tobytes() for im in images.reshape(-1, 28, 28) for r in range(4)}

    train_set, test_set = rotations(train), rotations(test)
    assert not train_set & test_set
    for split, own, other in ((train, train_set, test_set), (test, test_set, train_set)):
        tasks = draw(episode_sampler(split, 5, 1, 15, 8), jax.random.key(0))
        assert tasks.support_x.shape == (8, 5, 28, 28, 1) and tasks.query_x.shape == (8, 75, 28, 28, 1)
        images = np.concatenate([as_images(tasks.support_x), as_images(tasks.query_x)], axis=1).reshape(-1, 28, 28)
        seen = {im.tobytes() for im in images}
        assert seen <= own and not seen & other
