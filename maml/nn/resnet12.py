"""MetaOptNet's ResNet-12 (Lee et al. 2019) as a MAML network: batch norm with the batch's own statistics,
global average pooling and a linear head, for any image size >= 16 and any channel count."""

from __future__ import annotations

import itertools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .base import AbstractBatchModel
from .layers import AbstractConv3x3, Im2Col, batch_norm, max_pool_2x2

NEGATIVE_SLOPE = 0.1  # MetaOptNet's nn.LeakyReLU(0.1)


def _leaky_relu(x: Array) -> Array:
    return jax.nn.leaky_relu(x, NEGATIVE_SLOPE)


class ResNet12(AbstractBatchModel):
    """ResNet-12 on a whole batch: `x [N, H, W, C] -> [N, classes]`, `H, W >= 16`.

    The `ResNet12` of kjunelee/MetaOptNet `models/ResNet12_embedding.py`: four residual blocks of widths
    `widths` (64, 160, 320, 640 by default). A block of width `c` on `x [N, H, W, cin]`:
    `conv3x3 -> bn -> leaky_relu -> conv3x3 -> bn -> leaky_relu -> conv3x3 -> bn`, plus the shortcut
    `conv1x1(x) -> bn`, then `leaky_relu` (slope 0.1) and a 2x2 max-pool (VALID, as `nn.MaxPool2d(2)`)
    to `[N, H//2, W//2, c]`. Convolutions have no bias; the 1x1 shortcut is a matmul on channels.

    Differences from MetaOptNet, for MAML:
    - batch norm uses the batch's own statistics (learned scale and offset, no running statistics);
    - no DropBlock or dropout: MAML adapts and differentiates a deterministic network;
    - global average pooling of the last map to `[N, widths[-1]]` (MetaOptNet's `avg_pool=True` option,
      which for 84x84 inputs averages the same 5x5x640 map; its default flattens it), so the model is
      independent of the image size; then a linear head to `num_classes` (MetaOptNet has none: its head
      is an SVM / prototype classifier on the embedding).

    Initialisation: convolutions as MetaOptNet's `kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu')`
    (normal, std `sqrt(2 / (k*k*cout))`), batch norm scale 1 and offset 0, the head as PyTorch's
    `nn.Linear` default (uniform, bound `1/sqrt(widths[-1])`). `conv` is the 3x3 convolution of every
    block (`maml.nn.Im2Col()` by default), or a sequence of four (one per block).

    Parameters, block `b` of width `c` after `cin` channels: `conv_weights[b]` three `[3, 3, ., c]`
    (HWIO), `shortcut_weights[b]` `[cin, c]`, `bn_scales[b]` / `bn_offsets[b]` four `[c]` (after the three
    convolutions, then the shortcut's); `head_weight` / `head_bias` (what `maml.head_filter` adapts).
    """

    conv_weights: tuple[tuple[Float[Array, "3 3 cin cout"], ...], ...]
    shortcut_weights: tuple[Float[Array, "cin cout"], ...]
    bn_scales: tuple[tuple[Float[Array, " cout"], ...], ...]
    bn_offsets: tuple[tuple[Float[Array, " cout"], ...], ...]
    head_weight: Float[Array, "features classes"]
    head_bias: Float[Array, " classes"]
    convs: tuple[AbstractConv3x3, ...]

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        widths: Sequence[int] = (64, 160, 320, 640),
        *,
        conv: Union[AbstractConv3x3, Sequence[AbstractConv3x3]] = Im2Col(),
        key: PRNGKeyArray,
    ):
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ResNet12: {name}={value!r}; expected an integer >= 1")
        ok = isinstance(widths, Sequence) and not isinstance(widths, str) and len(widths) == 4
        if not ok or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in widths):
            raise ValueError(f"ResNet12: widths={widths!r}; expected 4 integers >= 1 (e.g. (64, 160, 320, 640))")
        if isinstance(conv, AbstractConv3x3):
            convs = (conv,) * 4
        else:
            convs = tuple(conv) if isinstance(conv, Sequence) and not isinstance(conv, str) else ()
        if len(convs) != 4 or not all(isinstance(c, AbstractConv3x3) for c in convs):
            raise ValueError(
                f"ResNet12: conv={conv!r}; expected a maml.nn.AbstractConv3x3 (e.g. Im2Col()) or 4 of them"
            )
        widths = tuple(widths)
        shapes, stds, cin = [], [], in_channels
        for c in widths:
            shapes += [(3, 3, cin, c), (3, 3, c, c), (3, 3, c, c), (cin, c)]
            stds += [(2.0 / (9 * c)) ** 0.5] * 3 + [(2.0 / c) ** 0.5]  # Kaiming normal: fan_out, gain sqrt(2)
            cin = c
        # One draw for all the weights, one for the head: a few dispatches instead of one per shape.
        kc, kh = jax.random.split(key)
        sizes = [math.prod(s) for s in shapes]
        pieces = jnp.split(jax.random.normal(kc, (sum(sizes),)), list(itertools.accumulate(sizes))[:-1])
        weights = [std * p.reshape(s) for p, s, std in zip(pieces, shapes, stds)]
        bound = 1.0 / widths[-1] ** 0.5  # PyTorch's nn.Linear default
        head = jax.random.uniform(kh, ((widths[-1] + 1) * num_classes,), minval=-bound, maxval=bound)
        self.conv_weights = tuple(tuple(weights[4 * b : 4 * b + 3]) for b in range(4))
        self.shortcut_weights = tuple(weights[4 * b + 3] for b in range(4))
        self.bn_scales = tuple(tuple(jnp.ones((c,)) for _ in range(4)) for c in widths)
        self.bn_offsets = tuple(tuple(jnp.zeros((c,)) for _ in range(4)) for c in widths)
        self.head_weight = head[num_classes:].reshape(widths[-1], num_classes)
        self.head_bias = head[:num_classes]
        self.convs = convs

    def norm_params(self) -> tuple[tuple[tuple[Array, ...], ...], tuple[tuple[Array, ...], ...]]:
        """The batch-norm scales and offsets, shortcuts' included (what `maml.nn.PerStep` makes per-step)."""
        return self.bn_scales, self.bn_offsets

    def features(self, x: Float[Array, "N H W C"]) -> Float[Array, "N features"]:
        """The embedding: the four blocks, then global average pooling, `[N, widths[-1]]`."""
        cin = self.conv_weights[0][0].shape[2]
        if x.ndim != 4 or x.shape[-1] != cin or x.shape[1] < 16 or x.shape[2] < 16:
            raise ValueError(
                f"ResNet12: x has shape {tuple(x.shape)}; expected [N, H, W, {cin}] (NHWC) with H, W >= 16"
            )
        for (w1, w2, w3), w_sc, (s1, s2, s3, s_sc), (o1, o2, o3, o_sc), conv in zip(
            self.conv_weights, self.shortcut_weights, self.bn_scales, self.bn_offsets, self.convs
        ):
            h = _leaky_relu(batch_norm(conv(x, w1), s1, o1))
            h = _leaky_relu(batch_norm(conv(h, w2), s2, o2))
            h = batch_norm(conv(h, w3), s3, o3)
            shortcut = batch_norm(jnp.einsum("nhwc,cd->nhwd", x, w_sc), s_sc, o_sc)
            x = max_pool_2x2(_leaky_relu(h + shortcut))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N classes"]:
        return self.features(x) @ self.head_weight + self.head_bias
