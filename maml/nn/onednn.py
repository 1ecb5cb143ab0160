"""3x3 convolutions run by oneDNN on the CPU in float32, differentiable to any order.

`OneDNN()` is a convolution value like `Winograd()`: `(x [N, H, W, C], w [3, 3, C, F]) -> [N, H, W, F]`.
It is a bilinear primitive whose derivatives are two primitives again:

- the convolution `conv(x, w)`; its transpose in `x` is `conv(ct, flip(w))` (kernel flipped in space,
  input and output channels swapped), its transpose in `w` is the weight gradient `wgrad(x, ct)`;
- the weight gradient `wgrad(x, g) [3, 3, C, F]`; its transposes are `conv(g, flip(ct))` (in `x`) and
  `conv(x, ct)` (in `g`).

So every derivative (second-order MAML, forward-over-reverse HVPs, third order) is made of these two.
Where they lower: to oneDNN through XLA's FFI on the CPU for float32 when the compiled extension
`maml.nn._onednn` is installed (built by `pip install` where `libdnnl-dev` is present); everywhere else
(float64, other platforms, no extension) to the JAX code of `fallback` (default `Winograd()`), with the
same rules, so the float64 finite-difference tests check the rules the float32 oneDNN path uses.
Both primitives carry a leading group axis G (vmapped tasks, each with its own weights). Each call runs
oneDNN single-threaded on work items spread over XLA's intra-op threads (groups, or a group's images; the
weight gradient's output channels), so it starts no OpenMP threads of its own: those made PyTorch's, in
the same process, 1.3-1.7x slower.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float

from .layers import AbstractConv3x3, Winograd, _check_conv_args

try:
    from . import _onednn
except ImportError:  # built only where oneDNN's headers and library were found at install time
    _onednn = None

_CONV_TARGET, _WGRAD_TARGET = "maml_onednn_conv3x3", "maml_onednn_wgrad3x3"
if _onednn is not None:
    for _name, _capsule in _onednn.handlers().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def available() -> bool:
    """Whether the oneDNN extension is installed (else `OneDNN` runs its `fallback`'s JAX code)."""
    return _onednn is not None


def buffer_bytes(reset: bool = False) -> tuple[int, int]:
    """`(now, peak)`: bytes the oneDNN calls' own buffers (blocked copies of activations, scratchpads; each freed
    when its piece of work ends) hold now, and the most they held at once since the last `reset=True` (which
    starts the count again from `now`). XLA's memory analysis does not see them. `(0, 0)` without the extension."""
    return tuple(_onednn.buffer_bytes(reset)) if _onednn is not None else (0, 0)


conv_p = Primitive("maml_conv3x3")
wgrad_p = Primitive("maml_wgrad3x3")


def _flip(w: Array) -> Array:
    """`[..., 3, 3, C, F] -> [..., 3, 3, F, C]`, flipped in space: the kernel of the data transpose."""
    return jnp.swapaxes(jnp.flip(w, (-4, -3)), -1, -2)


def _conv_ref(x, w, *, fallback):
    return jax.vmap(fallback)(x, w)


def _wgrad_ref(x, g, *, fallback):
    def one(x, g):
        w0 = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
        return jax.vjp(lambda w: fallback(x, w), w0)[1](g)[0]

    return jax.vmap(one)(x, g)


# Outside jit too, each primitive runs its compiled lowering (oneDNN where it applies).
for _p in (conv_p, wgrad_p):
    _p.def_impl(functools.partial(lambda p, a, b, *, fallback: jax.jit(functools.partial(p.bind, fallback=fallback))(a, b), _p))
conv_p.def_abstract_eval(lambda x, w, *, fallback: jax.core.ShapedArray(x.shape[:4] + (w.shape[4],), x.dtype))
wgrad_p.def_abstract_eval(
    lambda x, g, *, fallback: jax.core.ShapedArray((x.shape[0], 3, 3, x.shape[4], g.shape[4]), x.dtype)
)

# y = conv(x, w): <ct, y> = <conv(ct, flip(w)), x> = <wgrad(x, ct), w>.
ad.defbilinear(
    conv_p,
    lambda ct, x, w, *, fallback: conv_p.bind(ct, _flip(w), fallback=fallback),
    lambda ct, x, w, *, fallback: wgrad_p.bind(x, ct, fallback=fallback),
)
# v = wgrad(x, g): <ct, v> = <conv(x, ct), g> = <conv(g, flip(ct)), x>.
ad.defbilinear(
    wgrad_p,
    lambda ct, x, g, *, fallback: conv_p.bind(g, _flip(ct), fallback=fallback),
    lambda ct, x, g, *, fallback: conv_p.bind(x, ct, fallback=fallback),
)


def _to_front(a: Array, dim, size: int) -> Array:
    return jnp.broadcast_to(a, (size, *a.shape)) if dim is None else jnp.moveaxis(a, dim, 0)


def _merge(a: Array) -> Array:
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _conv_batch(args, dims, *, fallback):
    (x, w), (dx, dw) = args, dims
    if dw is None:  # shared weights: the batch joins the images of each group
        x = jnp.moveaxis(x, dx, 1)
        g, b, n = x.shape[:3]
        y = conv_p.bind(x.reshape(g, b * n, *x.shape[3:]), w, fallback=fallback)
        return y.reshape(g, b, n, *y.shape[2:]), 1
    size = w.shape[dw]
    x, w = _to_front(x, dx, size), _to_front(w, dw, size)
    y = conv_p.bind(_merge(x), _merge(w), fallback=fallback)
    return y.reshape(size, x.shape[1], *y.shape[1:]), 0


def _wgrad_batch(args, dims, *, fallback):
    (x, g), (dx, dg) = args, dims
    size = x.shape[dx] if dx is not None else g.shape[dg]
    x, g = _to_front(x, dx, size), _to_front(g, dg, size)
    v = wgrad_p.bind(_merge(x), _merge(g), fallback=fallback)
    return v.reshape(size, x.shape[1], *v.shape[1:]), 0


batching.primitive_batchers[conv_p] = _conv_batch
batching.primitive_batchers[wgrad_p] = _wgrad_batch


def _lowering(target: str, ref):
    """oneDNN for float32 (with the extension), else the JAX code of `ref`."""
    to_onednn = jax.ffi.ffi_lowering(target)
    to_jax = mlir.lower_fun(ref, multiple_results=False)

    def rule(ctx, a, b, *, fallback):
        if _onednn is not None and all(v.dtype == np.float32 for v in ctx.avals_in):
            return to_onednn(ctx, a, b)
        return to_jax(ctx, a, b, fallback=fallback)

    return rule


mlir.register_lowering(conv_p, _lowering(_CONV_TARGET, _conv_ref), platform="cpu")
mlir.register_lowering(wgrad_p, _lowering(_WGRAD_TARGET, _wgrad_ref), platform="cpu")
mlir.register_lowering(conv_p, mlir.lower_fun(_conv_ref, multiple_results=False))
mlir.register_lowering(wgrad_p, mlir.lower_fun(_wgrad_ref, multiple_results=False))


class OneDNN(AbstractConv3x3):
    """oneDNN's convolution on the CPU for float32: its Winograd F(4x4, 3x3) on its blocked layout where that
    was measured faster (AVX-512 CPUs, 16-channel multiples, images from 7x7; see `_onednn.cc`), else its direct
    convolution on NHWC (weights reordered to its blocked layout inside each call); `fallback`'s JAX code for
    other dtypes and platforms or without the extension. Its derivatives are this convolution again and its
    weight gradient (see the module docstring)."""

    fallback: AbstractConv3x3 = Winograd()

    def __call__(self, x: Float[Array, "N H W C"], w: Float[Array, "3 3 C F"]) -> Float[Array, "N H W F"]:
        _check_conv_args(x, w)
        if x.dtype != w.dtype:
            raise ValueError(f"OneDNN: x is {x.dtype} and w {w.dtype}; expected one dtype")
        return conv_p.bind(x[None], w[None], fallback=self.fallback)[0]
