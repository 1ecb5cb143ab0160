"""The MAML paper's Omniglot / mini-ImageNet network (Conv4), for any image size and channel count."""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .base import AbstractBatchModel
from .layers import AbstractConv3x3, Im2Col, Winograd, max_pool_2x2
from .onednn import OneDNN
from .onednn import available as onednn_available

# The wide forms' blocks from this many input channels (benchmarks/RESULTS.md, section 1).
WIDE_MIN_CHANNELS = 32


def default_convs(filters: int) -> tuple[AbstractConv3x3, ...]:
    """Conv4's convolutions for `filters` channels, the fastest measured on CPUs: `Im2Col` for the first block
    (1 or 3 input channels); after it, from 32 filters, `OneDNN()` where its extension is installed (1.3-1.5x
    the Winograd step on an AVX-512 CPU, at 9% more to 15% less peak memory) and else `Winograd` F(2x2, 3x3)
    (1.2-1.4x the im2col step at the MAML paper's 32 and 64); `Im2Col` below 32 filters (where oneDNN's and
    Winograd's steps run slower or barely faster, and Winograd's programs take twice as long to compile)."""
    if filters < WIDE_MIN_CHANNELS:
        return (Im2Col(),) * 4
    later = OneDNN() if onednn_available() else Winograd()
    return (Im2Col(), later, later, later)


class Conv4(AbstractBatchModel):
    """Conv4 on a whole batch: `x [N, H, W, C] -> [N, classes]`.

    Four blocks of 3x3 SAME convolution (no bias), batch norm with the batch's own statistics (learned
    scale and offset, no running statistics), ReLU and 2x2 max-pool (VALID; computed as pool then ReLU,
    the same function), then a linear head on the flattened `[s, s, filters]` features (`s = image_size`
    halved four times, rounding down). The MAML paper uses 64 filters on Omniglot (28x28x1) and 32 on
    mini-ImageNet (84x84x3). `conv` is the convolution of every block, or a sequence of four (by default
    `default_convs(filters)`: `Im2Col()` for the first block, then from 32 filters `OneDNN()` where its
    extension is installed, else `Winograd()`: the fastest measured on CPUs).
    """

    conv_weights: tuple[Float[Array, "3 3 cin cout"], ...]
    bn_scales: tuple[Float[Array, " cout"], ...]
    bn_offsets: tuple[Float[Array, " cout"], ...]
    head_weight: Float[Array, "features classes"]
    head_bias: Float[Array, " classes"]
    convs: tuple[AbstractConv3x3, ...]

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        filters: int = 64,
        image_size: int = 28,
        *,
        conv: Union[AbstractConv3x3, Sequence[AbstractConv3x3], None] = None,
        key: PRNGKeyArray,
    ):
        for name, value, low in (
            ("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
            ("filters", filters, 1), ("image_size", image_size, 16),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Conv4: {name}={value!r}; expected an integer >= {low}")
        if conv is None:
            conv = default_convs(filters)
        convs = (conv,) * 4 if isinstance(conv, AbstractConv3x3) else tuple(conv)
        if len(convs) != 4 or not all(isinstance(c, AbstractConv3x3) for c in convs):
            raise ValueError(f"Conv4: conv={conv!r}; expected a maml.nn.AbstractConv3x3 (e.g. Im2Col()) or 4 of them")
        keys = jax.random.split(key, 5)
        weights, cin = [], in_channels
        for k in keys[:4]:
            bound = 1.0 / (9 * cin) ** 0.5  # PyTorch's default (Kaiming uniform, a=sqrt(5))
            weights.append(jax.random.uniform(k, (3, 3, cin, filters), minval=-bound, maxval=bound))
            cin = filters
        size = image_size
        for _ in range(4):
            size //= 2
        features = size * size * filters
        bound = 1.0 / features**0.5
        kw, kb = jax.random.split(keys[4])
        self.conv_weights = tuple(weights)
        self.bn_scales = tuple(jnp.ones((filters,)) for _ in range(4))
        self.bn_offsets = tuple(jnp.zeros((filters,)) for _ in range(4))
        self.head_weight = jax.random.uniform(kw, (features, num_classes), minval=-bound, maxval=bound)
        self.head_bias = jax.random.uniform(kb, (num_classes,), minval=-bound, maxval=bound)
        self.convs = convs

    def norm_params(self) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        """The batch-norm scales and offsets (what `maml.nn.PerStep` makes per-step)."""
        return self.bn_scales, self.bn_offsets

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N classes"]:
        cin = self.conv_weights[0].shape[2]
        if x.ndim != 4 or x.shape[-1] != cin:
            raise ValueError(f"Conv4: x has shape {tuple(x.shape)}; expected [N, H, W, {cin}] (NHWC)")
        for w, s, o, conv in zip(self.conv_weights, self.bn_scales, self.bn_offsets, self.convs):
            # ReLU after the pool: the same function (ReLU is monotone, so it commutes with the maximum), its
            # forward and backward selects at a quarter of the size. The offset stays before the pool: added after
            # it (the same function in exact arithmetic) the float32 one-step meta-gradient of benchmarks.compare's
            # check was 24x further from float64's (8.4e-5 against 3.5e-6, 2026-12-08), for a reason not found.
            x = jax.nn.relu(max_pool_2x2(conv.normalised(x, w, s, o)))
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.head_weight.shape[0]:
            raise ValueError(
                f"Conv4: x gives {x.shape[1]} features but the head expects {self.head_weight.shape[0]}; "
                "expected images of the image_size the model was built with"
            )
        return x @ self.head_weight + self.head_bias
