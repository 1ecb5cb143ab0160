"""Experimental 3x3 convolution forms measured against the library's `Im2Col` / `LaxConv` (see
benchmarks/RESULTS.md, "Peers"): none was faster in the whole Conv4 meta-step on the 2-core CPU, so the
library keeps only the two it uses. Each is an `maml.nn.AbstractConv3x3`, usable as `Conv4(conv=...)`.

- `Shifted`: 9 accumulated matmuls on shifted slices (no 9x im2col copy);
- `Mixed`: im2col forward, with the input tangent through `lax.conv` (its transpose, the input gradient,
  is XLA's transposed convolution instead of scattering 9 shifted copies back);
- `Winograd`: Winograd F(2x2, 3x3), 16 matmuls on a quarter of the pixels (2.25x fewer multiplications).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from maml.nn import AbstractConv3x3, LaxConv, im2col_3x3


def _im2col_dot(cols: Array, w: Array) -> Array:
    n, h, wd, k = cols.shape
    return jnp.dot(cols.reshape(n * h * wd, k), w.reshape(k, w.shape[-1])).reshape(n, h, wd, w.shape[-1])


def _lax_conv(x: Array, w: Array) -> Array:
    return LaxConv()(x, w)


class Shifted(AbstractConv3x3):
    """9 accumulated matmuls `x[shifted] @ w[dy, dx]`."""

    def __call__(self, x, w):
        n, h, wd, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = None
        for dy in range(3):
            for dx in range(3):
                term = jnp.dot(xp[:, dy : dy + h, dx : dx + wd, :], w[dy, dx])
                out = term if out is None else out + term
        return out


class Mixed(AbstractConv3x3):
    """im2col forward; the tangent in `x` through `lax.conv`, the tangent in `w` through the im2col columns."""

    def __call__(self, x, w):
        return _conv_mixed(x, w)


class Winograd(AbstractConv3x3):
    """Winograd F(2x2, 3x3)."""

    def __call__(self, x, w):
        return conv3x3_winograd(x, w)


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


