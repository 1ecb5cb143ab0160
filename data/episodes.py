"""N-way K-shot episodes drawn on device from a class-major image array, with 90-degree rotations as
new classes (each character x 4 rotations is a class), as in the MAML paper's Omniglot setup.

Pure JAX: a whole batch of tasks comes from one key inside the jitted step (task i from
`fold_in(key, i)`), with the split on the device as `uint8 [C, D, 28, 28]`; no Python loop per task.
Colour splits `uint8 [C, D, H, W, channels]` (e.g. mini-ImageNet's `[64, 600, 84, 84, 3]`) work the same
way; there the examples keep their channel axis (grey images get a trailing axis of 1). Rotations as
classes are an Omniglot convention: pass `rotate=False` for natural images.
`EpisodeSampler.sample_range` draws a slice of that batch, so `maml.parallel` can split it across devices
(each device draws its own tasks, the same ones whatever the split).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from maml import Task

ROTATIONS = 4


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_episode_args(images_shape: tuple[int, ...], ways: int, shots: int, queries: int, rotate: bool,
                       num_tasks: int = 1) -> None:
    """Raise a one-line ValueError unless `images [C, D, H, W]` (or `[C, D, H, W, channels]`) can give
    `num_tasks` `ways`-way `shots`+`queries` tasks: the shape first, then each count, then whether they fit."""
    if len(images_shape) not in (4, 5):
        raise ValueError(
            f"episodes: images has shape {images_shape}; expected [characters, images, height, width] "
            "or [characters, images, height, width, channels]"
        )
    chars, per_char = images_shape[:2]
    for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0), ("num_tasks", num_tasks, 1)):
        if not _is_integer(value) or value < low:
            raise ValueError(f"episodes: {name}={value!r}; expected an integer >= {low}")
    classes = chars * (ROTATIONS if rotate else 1)
    if ways > classes:
        how = f"{chars} characters x {ROTATIONS} rotations" if rotate else f"{chars} classes, no rotations"
        raise ValueError(f"episodes: ways={ways} is more than the split's {classes} classes ({how})")
    if shots + queries > per_char:
        raise ValueError(
            f"episodes: shots + queries = {shots} + {queries} = {shots + queries}; "
            f"expected at most {per_char} images per character"
        )
    height, width = images_shape[2:4]
    if min(height, width) < 1 or (rotate and height != width):
        raise ValueError(f"episodes: images has shape {images_shape}; expected images of at least 1 x 1 pixels"
                         + (", square to be rotated (or rotate=False)" if rotate else ""))


def sample_episode(
    key: PRNGKeyArray,
    images: UInt8[Array, "C D H W"] | UInt8[Array, "C D H W ch"],
    ways: int,
    shots: int,
    queries: int,
    rotate: bool = True,
) -> Task:
    """One task: `support_x float32 [N*K, H, W, 1]` in [0, 1] (`[N*K, H, W, ch]` from colour images),
    `support_y int32 [N*K]` in [0, N), and the query set likewise with `N*Q` examples. Examples are
    class-major (class j at rows j*K .. j*K+K-1).

    Classes are drawn without replacement from characters x rotations; images of a class from its
    character's D drawers without replacement, so support and query never share an image.
    """
    chars, per_char = images.shape[:2]
    num_classes = chars * (ROTATIONS if rotate else 1)
    # One uniform draw per task (each random call costs seconds of XLA compile time on CPU); the top-k of
    # i.i.d. scores is a uniformly random subset in uniformly random order.
    scores = jax.random.uniform(key, (num_classes + ways * per_char,))
    classes = jax.lax.top_k(scores[:num_classes], ways)[1]
    char, rot = classes % chars, classes // chars
    drawers = jax.lax.top_k(scores[num_classes:].reshape(ways, per_char), shots + queries)[1]
    x = images[char[:, None], drawers]  # [N, K+Q, H, W] (or [N, K+Q, H, W, ch]) uint8
    if rotate:
        rotated = jnp.stack([jnp.rot90(x, r, axes=(2, 3)) for r in range(ROTATIONS)])  # [4, N, K+Q, H, W(, ch)]
        x = rotated[rot, jnp.arange(ways)]
    x = x.astype(jnp.float32) / 255.0
    if x.ndim == 4:  # grey: add the channel axis
        x = x[..., None]
    y = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[:, None], (ways, shots + queries))
    size = x.shape[2:]
    return Task(
        x[:, :shots].reshape(ways * shots, *size),
        y[:, :shots].reshape(ways * shots),
        x[:, shots:].reshape(ways * queries, *size),
        y[:, shots:].reshape(ways * queries),
    )


def sample_episodes(
    key: PRNGKeyArray,
    images: UInt8[Array, "C D H W"] | UInt8[Array, "C D H W ch"],
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    rotate: bool = True,
    start: int | Int[Array, ""] = 0,
) -> Task:
    """A batch of `num_tasks` episodes (leading task axis B): tasks `start .. start+B-1`, task i being
    `sample_episode(fold_in(key, i))` (`start` may be a traced int32 scalar).

    `support_x float32 [B, N*K, H, W, 1]` (`ch` channels for colour), `support_y int32 [B, N*K]`,
    `query_x [B, N*Q, H, W, 1]`, `query_y int32 [B, N*Q]`.
    """
    check_episode_args(tuple(images.shape), ways, shots, queries, rotate)
    if not _is_integer(num_tasks) or num_tasks < 1:
        raise ValueError(f"episodes: num_tasks={num_tasks!r}; expected an integer >= 1")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(num_tasks, dtype=jnp.int32))
    return jax.vmap(lambda k: sample_episode(k, images, ways, shots, queries, rotate))(keys)


class EpisodeSampler(eqx.Module):
    """`key -> Task` batch sampler over one split held on the device (for `maml.with_task_sampler`).

    A module, so the images are a pytree leaf: pass the sampler into a jitted function as an argument
    to keep the split out of the compiled program's constants. Follows `maml.parallel`'s sampler
    protocol (`num_tasks`, `sample_range`), so the parallel steps can split its batch across devices.
    """

    images: UInt8[Array, "C D H W"] | UInt8[Array, "C D H W ch"]
    ways: int = eqx.field(static=True)
    shots: int = eqx.field(static=True)
    queries: int = eqx.field(static=True)
    num_tasks: int = eqx.field(static=True)
    rotate: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        check_episode_args(tuple(self.images.shape), self.ways, self.shots, self.queries, self.rotate,
                           self.num_tasks)

    @property
    def num_classes(self) -> int:
        """Characters x rotations (or characters alone without rotations)."""
        return self.images.shape[0] * (ROTATIONS if self.rotate else 1)

    def __call__(self, key: PRNGKeyArray) -> Task:
        return sample_episodes(key, self.images, self.ways, self.shots, self.queries, self.num_tasks, self.rotate)

    def sample_range(self, key: PRNGKeyArray, start: int | Int[Array, ""], count: int) -> Task:
        """Tasks `start .. start+count-1` of the batch `self(key)` draws (leading axis `count`, a static int)."""
        return sample_episodes(key, self.images, self.ways, self.shots, self.queries, count, self.rotate, start)


def episode_sampler(
    images: UInt8[np.ndarray | Array, "C D H W"] | UInt8[np.ndarray | Array, "C D H W ch"],
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    *,
    rotate: bool = True,
) -> EpisodeSampler:
    """Put `images` (class-major uint8, e.g. from `data.omniglot.split_by_alphabet`) on the default device
    and return a `key -> Task` sampler of `num_tasks` `ways`-way `shots`-shot tasks with `queries` queries."""
    return EpisodeSampler(jnp.asarray(images, dtype=jnp.uint8), ways, shots, queries, num_tasks, rotate)


def as_images(x: Float[Array, "... H W ch"]) -> UInt8[Array, "... H W"] | UInt8[Array, "... H W ch"]:
    """Back to uint8 images (inverse of the sampler's scaling), e.g. to compare with the source split:
    `[..., H, W]` from grey `[..., H, W, 1]`, colour `[..., H, W, ch]` kept as it is."""
    u8 = jnp.round(x * 255.0).astype(jnp.uint8)
    return u8[..., 0] if x.shape[-1] == 1 else u8
