"""Experimental 3x3 convolution forms measured against the library's `Im2Col` / `Winograd` / `LaxConv` (see
benchmarks/RESULTS.md, section 1): none was faster in the whole Conv4 meta-step on the 2-core CPU, so the
library keeps only the ones it uses. Each is an `maml.nn.AbstractConv3x3`, usable as `Conv4(conv=...)`.

- `Shifted`: 9 accumulated matmuls on shifted slices (no 9x im2col copy);
- `Mixed`: im2col forward, with the input tangent through `lax.conv` (its transpose, the input gradient,
  is XLA's transposed convolution instead of scattering 9 shifted copies back).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array

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
