"""Fast NHWC layers for `Conv4` on CPUs, differentiable to any order.

- `conv3x3`: 3x3 SAME convolution as im2col (pad, 9 shifted slices, one matmul) or `lax.conv`;
- `max_pool_2x2`: 2x2/2 max-pool (VALID: odd sizes drop their last row/column) whose derivative routes
  the tangent through an equality mask (a `jax.custom_jvp` linear in the tangent, so JAX transposes it
  for reverse mode and differentiates it again for second-order MAML and forward-over-reverse HVPs);
- `batch_norm`: normalisation with the batch's own statistics, then a learned affine map.

Everything here is built from primitives whose derivatives are themselves differentiable (no
`custom_vjp`), so `jax.grad(jax.grad(...))`, `jax.jvp(jax.grad(...))` and `vmap` all work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

CONV_IMPLS = ("im2col", "lax", "shifted", "mixed", "winograd")


def im2col_3x3(x: Float[Array, "N H W C"]) -> Float[Array, "N H W 9*C"]:
    """The 9 SAME-padded 3x3 neighbours of every pixel, concatenated on the channel axis (dy-major)."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)], axis=-1)


def conv3x3(
    x: Float[Array, "N H W C"], w: Float[Array, "3 3 C F"], impl: str = "im2col"
) -> Float[Array, "N H W F"]:
    """3x3 convolution, stride 1, SAME padding, no bias (batch norm follows). `w` is HWIO.

    `impl`: "im2col" (one matmul on the 9 shifted copies; fastest on CPU for few input channels or
    small images), "shifted" (9 accumulated matmuls, no 9x copy), or "lax" (`lax.conv_general_dilated`).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv3x3: impl={impl!r}; expected one of {CONV_IMPLS}")
    if x.ndim != 4 or w.shape[:2] != (3, 3) or w.shape[2] != x.shape[-1]:
        raise ValueError(
            f"conv3x3: x has shape {tuple(x.shape)} and w {tuple(w.shape)}; expected x [N, H, W, C] "
            "and w [3, 3, C, F]"
        )
    n, h, wd, c = x.shape
    f = w.shape[-1]
    if impl == "lax":
        return _lax_conv(x, w)
    if impl == "shifted":
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = None
        for dy in range(3):
            for dx in range(3):
                term = jnp.dot(xp[:, dy : dy + h, dx : dx + wd, :], w[dy, dx])
                out = term if out is None else out + term
        return out
    if impl == "mixed":
        return _conv_mixed(x, w)
    if impl == "winograd":
        return conv3x3_winograd(x, w)
    return _im2col_dot(im2col_3x3(x), w)


def _im2col_dot(cols: Array, w: Array) -> Array:
    n, h, wd, k = cols.shape
    return jnp.dot(cols.reshape(n * h * wd, k), w.reshape(k, w.shape[-1])).reshape(n, h, wd, w.shape[-1])


def _lax_conv(x: Array, w: Array) -> Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_jvp
def _conv_mixed(x: Array, w: Array) -> Array:
    """im2col forward; the tangent in `x` through `lax.conv` (so its transpose, the input gradient, is
    XLA's transposed convolution instead of scattering 9 shifted copies back), the tangent in `w`
    through the same im2col columns (so the weight gradient is one matmul `cols^T @ ct`)."""
    return _im2col_dot(im2col_3x3(x), w)


def _conv_mixed_jvp(primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    cols = im2col_3x3(x)
    terms = [] if isinstance(tx, SymbolicZero) else [_lax_conv(tx, w)]
    if not isinstance(tw, SymbolicZero):
        terms.append(_im2col_dot(cols, tw))
    y = _im2col_dot(cols, w)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv_mixed.defjvp(_conv_mixed_jvp, symbolic_zeros=True)


# Winograd F(2x2, 3x3): y = A^T [(G g G^T) * (B^T d B)] A on 4x4 input tiles with stride 2.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(coeffs, terms):
    """sum_i coeffs[i] * terms[i], skipping zero coefficients (all +-1 or +-0.5 here)."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        t = t if c == 1 else (-t if c == -1 else c * t)
        out = t if out is None else out + t
    return out


def conv3x3_winograd(x: Float[Array, "N H W C"], w: Float[Array, "3 3 C F"]) -> Float[Array, "N H W F"]:
    """3x3 SAME convolution by Winograd F(2x2, 3x3): 16 matmuls `[N*tiles, C] @ [C, F]` instead of 9,
    each on a quarter of the pixels (2.25x fewer multiplications). Linear pieces only, so JAX's own
    derivatives (to any order) are Winograd-shaped too."""
    n, h, wd, c = x.shape
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
    d = [[xp[:, i : i + 2 * th : 2, j : j + 2 * tw : 2, :] for j in range(4)] for i in range(4)]
    rows = [[_combine(_BT[a], [d[i][j] for i in range(4)]) for j in range(4)] for a in range(4)]
    v = jnp.stack([_combine(_BT[b], rows[a]) for a in range(4) for b in range(4)])  # [16, N, th, tw, C]
    gw = [[_combine(_G[a], [w[i, j] for i in range(3)]) for j in range(3)] for a in range(4)]
    u = jnp.stack([_combine(_G[b], gw[a]) for a in range(4) for b in range(4)])  # [16, C, F]
    m = jnp.einsum("knc,kcf->knf", v.reshape(16, n * th * tw, c), u).reshape(4, 4, n, th, tw, -1)
    mr = [[_combine(_AT[r], [m[a, b] for a in range(4)]) for b in range(4)] for r in range(2)]
    y = jnp.stack([jnp.stack([_combine(_AT[s_], mr[r]) for s_ in range(2)], axis=3) for r in range(2)], axis=2)
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :wd, :]


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
