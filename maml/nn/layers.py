"""Fast NHWC layers for the convolutional models, differentiable to any order.

- 3x3 SAME convolutions as values (`Im2Col`, `Winograd`, `LaxConv`; `AbstractConv3x3` for others):
  im2col pads, takes 9 shifted slices and does one matmul (fastest on CPUs for few input channels);
  `Winograd` is F(2x2, 3x3), 16 matmuls on a quarter of the pixels (2.25x fewer multiplications and a
  4x instead of 9x copy of the input: fastest on CPUs from 32 input channels); `LaxConv` is
  `lax.conv_general_dilated` (what accelerators' libraries implement);
- `max_pool_2x2`: 2x2/2 max-pool (VALID: odd sizes drop their last row/column) whose derivative routes
  the tangent through the members equal to the maximum, read from a one-byte code per window (a
  `jax.custom_jvp` linear in the tangent, so JAX transposes it for reverse mode and differentiates it
  again for second-order MAML and forward-over-reverse HVPs);
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

    def normalised(
        self, x: Float[Array, "N H W C"], w: Float[Array, "3 3 C F"], scale: Float[Array, " F"],
        offset: Float[Array, " F"], eps: float = 1e-5,
    ) -> Float[Array, "N H W F"]:
        """`batch_norm(self(x, w), scale, offset, eps)`: the convolution, then batch norm with the batch's own
        statistics (a form may compute the two together)."""
        return batch_norm(self(x, w), scale, offset, eps)


# Im2Col folds batch norm into its matmul up to this many patch columns (9C): its statistics then come from a
# [9C, 9C] covariance of the patches, cheap for Conv4's first block (9 or 27) but not at 64 channels (576).
FOLD_MAX_COLUMNS = 32


class Im2Col(AbstractConv3x3):
    """One matmul `[N*H*W, 9C] @ [9C, F]` on the 9 shifted copies of the input (`im2col_3x3`).

    `normalised` (batch norm of the convolution) folds the normalisation into that matmul where 9C is at most
    `FOLD_MAX_COLUMNS`: the output's per-channel mean is `mean(P) @ w` and its variance `diag(w^T cov(P) w)` for
    the patches P, so the output `(P - mean(P)) @ (w * s) + offset` is written once, already normalised, and
    never reduced (nor are its gradients: the statistics' derivatives are those of the small covariance)."""

    def __call__(self, x, w):
        _check_conv_args(x, w)
        cols = im2col_3x3(x)
        n, h, wd, k = cols.shape
        return jnp.dot(cols.reshape(n * h * wd, k), w.reshape(k, w.shape[-1])).reshape(n, h, wd, w.shape[-1])

    def normalised(self, x, w, scale, offset, eps: float = 1e-5):
        _check_conv_args(x, w)
        if 9 * x.shape[-1] > FOLD_MAX_COLUMNS:
            return batch_norm(self(x, w), scale, offset, eps)
        cols = im2col_3x3(x)
        n, h, wd, k = cols.shape
        p, w2 = cols.reshape(n * h * wd, k), w.reshape(k, w.shape[-1])
        mu = jnp.mean(p, axis=0)
        centred = p - mu
        cov = centred.T @ centred / p.shape[0]  # [9C, 9C]
        s = scale * jax.lax.rsqrt(jnp.sum(w2 * (cov @ w2), axis=0) + eps)
        # The centred patches, not P with the mean's term as a bias: then the kernel's gradient is a sum of
        # centred terms (P's uncentred sum and the mean's term would cancel, losing float32 digits).
        return (jnp.dot(centred, w2 * s) + offset).reshape(n, h, wd, w.shape[-1])


# Winograd F(2, 3) along one axis: input transform B^T (4 taps of a 4-wide tile -> 4 values), kernel
# transform G (3 taps -> 4 values); the output transform A^T (4 -> 2) is written out in `_winograd_output`.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_input(x: Array, axis: int) -> list[Array]:
    """B^T of F(2, 3) along `axis` (length 2T + 2, padded): the 4 transformed taps, each of length T there.

    Tile t covers rows 2t .. 2t+3; viewing the axis as (T + 1) pairs of rows (a free reshape), the
    rows are pair t and pair t + 1, so every tap is a unit-stride slice (their transposes are plain pads;
    strided slices made the gradient slow)."""
    shape = x.shape
    pairs = x.reshape(shape[:axis] + (shape[axis] // 2, 2) + shape[axis + 1 :])
    t = shape[axis] // 2 - 1

    def row(first: int, which: int) -> Array:
        index = [slice(None)] * pairs.ndim
        index[axis], index[axis + 1] = slice(first, first + t), which
        return pairs[tuple(index)]

    r0, r1, r2, r3 = row(0, 0), row(0, 1), row(1, 0), row(1, 1)  # rows 2t, 2t+1, 2t+2, 2t+3
    return [r0 - r2, r1 + r2, r2 - r1, r1 - r3]


def _winograd_kernel(w: Array) -> list[Array]:
    """G w G^T: the 16 transformed `[C, F]` kernel taps (row-major over the 4x4 tile) of `w [3, 3, C, F]`."""

    def combine(coeffs, terms):
        return sum((c * t for c, t in zip(coeffs, terms) if c != 0), start=jnp.zeros_like(terms[0]))

    rows = [[combine(g, [w[i, j] for i in range(3)]) for j in range(3)] for g in _WINOGRAD_G]
    return [combine(g, r) for r in rows for g in _WINOGRAD_G]


def _winograd_output(m: list[list[Array]]) -> list[list[Array]]:
    """A^T m A on the 4x4 grid `m` of `[N, T, T', F]` products: the 2x2 grid of output pixels."""
    a = [[m[0][b] + m[1][b] + m[2][b] for b in range(4)], [m[1][b] - m[2][b] - m[3][b] for b in range(4)]]
    return [[r[0] + r[1] + r[2], r[1] - r[2] - r[3]] for r in a]


class Winograd(AbstractConv3x3):
    """Winograd F(2x2, 3x3): 4x4 input tiles at stride 2 are transformed (B^T d B), multiplied tap by tap
    with the transformed kernel (16 matmuls `[N*T*T', C] @ [C, F]`, T = ceil(H/2)) and transformed back
    (A^T m A) to 2x2 output pixels. Exact in exact arithmetic (float64 agrees with `LaxConv` to rounding);
    built of slices, adds and matmuls, so JAX's derivatives of any order are Winograd-shaped too."""

    def __call__(self, x, w):
        _check_conv_args(x, w)
        n, h, wd, c = x.shape
        th, tw = -(-h // 2), -(-wd // 2)
        xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
        taps = [t for rows in _winograd_input(xp, 1) for t in _winograd_input(rows, 2)]  # 16 x [N, th, tw, C]
        # Separate 2-D matmuls: XLA's CPU backend runs them (and their transposes) faster than one batched dot.
        m = [jnp.dot(t.reshape(-1, c), u).reshape(n, th, tw, -1) for t, u in zip(taps, _winograd_kernel(w))]
        y = _winograd_output([m[4 * a : 4 * a + 4] for a in range(4)])
        y = jnp.stack([jnp.stack(y[0], axis=3), jnp.stack(y[1], axis=3)], axis=2)  # [N, th, 2, tw, 2, F]
        return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :wd, :]


class LaxConv(AbstractConv3x3):
    """`lax.conv_general_dilated` in NHWC / HWIO."""

    def __call__(self, x, w):
        _check_conv_args(x, w)
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _windows(x: Array) -> Array:
    """`x [N, H, W, C]` cropped to even H, W and viewed as `[N, H/2, 2, W/2, 2, C]` (a free reshape)."""
    n, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


def _members(x: Array) -> list[Array]:
    """The four members `[N, H/2, W/2, C]` of every 2x2 window of `x` (row-major within the window)."""
    xw = _windows(x)
    return [xw[:, :, a, :, b] for a in (0, 1) for b in (0, 1)]


def _pool_code(x: Array) -> tuple[Array, Array]:
    """The pooled maximum `m` and each window's code `[N, H/2, W/2, C]` (uint8): bit i set where member i
    equals the maximum."""
    p = _members(x)
    m = jnp.maximum(jnp.maximum(p[0], p[1]), jnp.maximum(p[2], p[3]))
    return m, sum((q == m).astype(jnp.uint8) << i for i, q in enumerate(p))


@jax.custom_jvp
def max_pool_2x2(x: Float[Array, "N H W C"]) -> Float[Array, "N H//2 W//2 C"]:
    """2x2 max-pool with stride 2 (VALID: an odd last row/column is dropped).

    Derivative: each window's tangent is the mean of its members' tangents over the members equal to
    the maximum (one member without ties; ties share equally, a valid subgradient). The rule is a
    fixed 0/1-over-k weight per member times the tangent, read from a one-byte code per window (which
    members tie for the maximum) at pooled size, so reverse mode is one elementwise pass at full size
    instead of XLA's select-and-scatter, and no full-size mask is stored (XLA may recompute the code
    from the input in the backward pass instead of storing it).
    """
    if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"max_pool_2x2: x has shape {tuple(x.shape)}; expected [N, H, W, C] with H, W >= 2")
    return _pool_code(x)[0]


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # The code is piecewise constant in x (no derivative); the output is this function again, so
    # derivatives of any order of the output keep using this rule.
    code = jax.lax.stop_gradient(_pool_code(x)[1])
    bits = [((code >> i) & 1).astype(t.dtype) for i in range(4)]
    tp = _members(t)
    # Sum the window's members elementwise and divide at pooled size (no reduce, no full-size divide).
    return max_pool_2x2(x), sum(u * b for u, b in zip(tp, bits)) / sum(bits)


def batch_norm(
    x: Float[Array, "N H W C"], scale: Float[Array, " C"], offset: Float[Array, " C"], eps: float = 1e-5
) -> Float[Array, "N H W C"]:
    """Batch norm with the batch's own statistics (per channel over N, H, W), then `scale * . + offset`."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    centred = x - mean
    var = jnp.mean(centred * centred, axis=(0, 1, 2))
    return centred * (scale * jax.lax.rsqrt(var + eps)) + offset
