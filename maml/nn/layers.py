"""Fast NHWC layers for the convolutional models, differentiable to any order.

- 3x3 SAME convolutions as values (`Im2Col`, `LaxConv`; `AbstractConv3x3` for others): im2col pads,
  takes 9 shifted slices and does one matmul (fastest on CPUs for these sizes); `LaxConv` is
  `lax.conv_general_dilated` (what accelerators' libraries implement);
- `max_pool_2x2`: 2x2/2 max-pool (VALID: odd sizes drop their last row/column) whose derivative routes
  the tangent through an equality mask (a `jax.custom_jvp` linear in the tangent, so JAX transposes it
  for reverse mode and differentiates it again for second-order MAML and forward-over-reverse HVPs);
- `batch_norm`: normalisation with the batch's own statistics, then a learned affine map.

Everything here is built from primitives whose derivatives are themselves differentiable (no
`custom_vjp`), so `jax.grad(jax.grad(...))`, `jax.jvp(jax.grad(...))` and `vmap` all work.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def im2col_3x3(x: Float[Array, "N H W C"]) -> Float[Array, "N H W 9*C"]:
    """The 9 SAME-padded 3x3 neighbours of every pixel, concatenated on the channel axis (dy-major)."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)], axis=-1)


def _check_conv_args(x: Array, w: Array) -> None:
    if x.ndim != 4 or w.ndim != 4 or w.shape[:2] != (3, 3) or w.shape[2] != x.shape[-1]:
        raise ValueError(
            f"conv3x3: x has shape {tuple(x.shape)} and w {tuple(w.shape)}; expected x [N, H, W, C] "
            "and w [3, 3, C, F]"
        )


class AbstractConv3x3(eqx.Module):
    """A 3x3 convolution, stride 1, SAME padding, no bias: `(x [N, H, W, C], w [3, 3, C, F] HWIO) -> [N, H, W, F]`."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "N H W C"], w: Float[Array, "3 3 C F"]) -> Float[Array, "N H W F"]:
        """The convolution of `x` with `w`."""


class Im2Col(AbstractConv3x3):
    """One matmul `[N*H*W, 9C] @ [9C, F]` on the 9 shifted copies of the input (`im2col_3x3`)."""

    def __call__(self, x, w):
        _check_conv_args(x, w)
        cols = im2col_3x3(x)
        n, h, wd, k = cols.shape
        return jnp.dot(cols.reshape(n * h * wd, k), w.reshape(k, w.shape[-1])).reshape(n, h, wd, w.shape[-1])


class LaxConv(AbstractConv3x3):
    """`lax.conv_general_dilated` in NHWC / HWIO."""

    def __call__(self, x, w):
        _check_conv_args(x, w)
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _windows(x: Array) -> Array:
    """`x [N, H, W, C]` cropped to even H, W and viewed as `[N, H/2, 2, W/2, 2, C]` (a free reshape)."""
    n, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


def _pool_parts(x: Array) -> tuple[Array, Array, Array]:
    """The pooled maximum `m`, the 0/1 mask `eq [N, H/2, 2, W/2, 2, C]` of the members equal to their
    window's maximum, and each window's number of such members `count`."""
    xw = _windows(x)
    m = jnp.maximum(jnp.maximum(xw[:, :, 0, :, 0], xw[:, :, 0, :, 1]), jnp.maximum(xw[:, :, 1, :, 0], xw[:, :, 1, :, 1]))
    eq = (xw == m[:, :, None, :, None, :]).astype(x.dtype)
    count = eq[:, :, 0, :, 0] + eq[:, :, 0, :, 1] + eq[:, :, 1, :, 0] + eq[:, :, 1, :, 1]
    return m, eq, count


@jax.custom_jvp
def max_pool_2x2(x: Float[Array, "N H W C"]) -> Float[Array, "N H//2 W//2 C"]:
    """2x2 max-pool with stride 2 (VALID: an odd last row/column is dropped).

    Derivative: each window's tangent is the mean of its members' tangents over the members equal to
    the maximum (one member without ties; ties share equally, a valid subgradient). The rule is a
    fixed 0/1-over-k mask times the tangent, so reverse mode is one elementwise product at full size
    instead of XLA's select-and-scatter.
    """
    if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"max_pool_2x2: x has shape {tuple(x.shape)}; expected [N, H, W, C] with H, W >= 2")
    return _pool_parts(x)[0]


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # The mask is piecewise constant in x (no derivative); the output is this function again, so
    # derivatives of any order of the output keep using this rule.
    _, eq, count = jax.lax.stop_gradient(_pool_parts(x))
    m = max_pool_2x2(x)
    tw = _windows(t) * eq
    # Sum the window's members elementwise and divide at pooled size (no reduce, no full-size divide).
    return m, (tw[:, :, 0, :, 0] + tw[:, :, 0, :, 1] + tw[:, :, 1, :, 0] + tw[:, :, 1, :, 1]) / count


def batch_norm(
    x: Float[Array, "N H W C"], scale: Float[Array, " C"], offset: Float[Array, " C"], eps: float = 1e-5
) -> Float[Array, "N H W C"]:
    """Batch norm with the batch's own statistics (per channel over N, H, W), then `scale * . + offset`."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    centred = x - mean
    var = jnp.mean(centred * centred, axis=(0, 1, 2))
    return centred * (scale * jax.lax.rsqrt(var + eps)) + offset
