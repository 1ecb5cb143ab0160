"""Prototype: a 3x3 conv whose derivatives are convolutions again (two bilinear primitives)."""
import jax, jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir, batching
import equinox as eqx
from maml.nn.layers import AbstractConv3x3, Winograd

def flipT(w):
    return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)

conv_p = Primitive("conv3x3_ruled")
wgrad_p = Primitive("conv3x3_ruled_wgrad")

def _conv_impl(x, w, *, conv):
    return conv(x, w)

import os
from maml.nn.layers import _winograd_input, _winograd_kernel
BARRIER = os.environ.get("BARRIER", "1") == "1"
def _wgrad_impl(x, g, *, conv):
    w0 = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
    if not isinstance(conv, Winograd):
        return jax.vjp(lambda w: conv(x, w), w0)[1](g)[0]
    n, h, wd, c = x.shape
    f = g.shape[-1]
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
    taps = [t for rows in _winograd_input(xp, 1) for t in _winograd_input(rows, 2)]
    gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - wd), (0, 0))).reshape(n, th, 2, tw, 2, f)
    def adj(y0, y1):
        return [y0, y0 + y1, y0 - y1, -y1]
    rows = adj(gp[:, :, 0], gp[:, :, 1])  # each [n, th, tw, 2, f]
    ms = [m for r in rows for m in adj(r[:, :, :, 0], r[:, :, :, 1])]
    def tdot(t, m):
        tt = t.reshape(-1, c).T
        if BARRIER:
            tt = jax.lax.optimization_barrier(tt)
        return jnp.dot(tt, m.reshape(-1, f))
    ms = jax.lax.optimization_barrier(ms) if os.environ.get('BM','1')=='1' else ms
    us = [tdot(t, m) for t, m in zip(taps, ms)]
    us = jax.lax.optimization_barrier(us) if os.environ.get('BU','1')=='1' else us
    _, kt = jax.vjp(_winograd_kernel, w0)
    return kt(us)[0]

conv_p.def_impl(lambda x, w, conv: jax.jit(_conv_impl, static_argnames="conv")(x, w, conv=conv))
wgrad_p.def_impl(lambda x, g, conv: jax.jit(_wgrad_impl, static_argnames="conv")(x, g, conv=conv))
conv_p.def_abstract_eval(lambda x, w, conv: jax.core.ShapedArray(x.shape[:3] + (w.shape[3],), x.dtype))
wgrad_p.def_abstract_eval(lambda x, g, conv: jax.core.ShapedArray((3, 3, x.shape[3], g.shape[3]), x.dtype))
mlir.register_lowering(conv_p, mlir.lower_fun(_conv_impl, multiple_results=False))
mlir.register_lowering(wgrad_p, mlir.lower_fun(_wgrad_impl, multiple_results=False))

def conv(x, w, c): return conv_p.bind(x, w, conv=c)
def wgrad(x, g, c): return wgrad_p.bind(x, g, conv=c)

# y = conv(x, w): <ct, y> = <conv(ct, flipT(w)), x> = <wgrad(x, ct), w>
def _conv_tx(ct, x, w, *, conv):
    return conv_p.bind(ct, flipT(w), conv=conv)
def _conv_tw(ct, x, w, *, conv):
    return wgrad_p.bind(x, ct, conv=conv)
ad.defbilinear(conv_p, _conv_tx, _conv_tw)
# v = wgrad(x, g): <c, v> = <conv(x, c), g> = <conv(g, flipT(c)), x>
def _wgrad_tx(ct, x, g, *, conv):
    return conv_p.bind(g, flipT(ct), conv=conv)
def _wgrad_tg(ct, x, g, *, conv):
    return conv_p.bind(x, ct, conv=conv)
ad.defbilinear(wgrad_p, _wgrad_tx, _wgrad_tg)

def _batch(impl):
    def rule(args, dims, **params):
        return jax.vmap(lambda a, b: impl(a, b, **params), in_axes=dims)(*args), 0
    return rule
batching.primitive_batchers[conv_p] = _batch(_conv_impl)
batching.primitive_batchers[wgrad_p] = _batch(_wgrad_impl)

class Ruled(AbstractConv3x3):
    inner: AbstractConv3x3 = Winograd()
    def __call__(self, x, w):
        return conv_p.bind(x, w, conv=self.inner)

import numpy as np
from maml.nn.layers import _winograd_output, _check_conv_args
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = np.einsum("ai,bj->abij", _G, _G).reshape(16, 9)

def kernel_dot(w):
    c, f = w.shape[2], w.shape[3]
    u = jnp.dot(jnp.asarray(_GG, w.dtype), w.reshape(9, c * f))
    return [u[k].reshape(c, f) for k in range(16)]

class WinogradDot(AbstractConv3x3):
    def __call__(self, x, w):
        n, h, wd, c = x.shape
        th, tw = -(-h // 2), -(-wd // 2)
        xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
        taps = [t for rows in _winograd_input(xp, 1) for t in _winograd_input(rows, 2)]
        m = [jnp.dot(t.reshape(-1, c), u).reshape(n, th, tw, -1) for t, u in zip(taps, kernel_dot(w))]
        y = _winograd_output([m[4 * a : 4 * a + 4] for a in range(4)])
        y = jnp.stack([jnp.stack(y[0], axis=3), jnp.stack(y[1], axis=3)], axis=2)
        return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :wd, :]

def _wgrad_dot(x, g):
    n, h, wd, c = x.shape
    f = g.shape[-1]
    th, tw = -(-h // 2), -(-wd // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
    taps = [t for rows in _winograd_input(xp, 1) for t in _winograd_input(rows, 2)]
    gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - wd), (0, 0))).reshape(n, th, 2, tw, 2, f)
    adj = lambda y0, y1: [y0, y0 + y1, y0 - y1, -y1]
    ms = [m for r in adj(gp[:, :, 0], gp[:, :, 1]) for m in adj(r[:, :, :, 0], r[:, :, :, 1])]
    us = jnp.stack([jax.lax.dot_general(t.reshape(-1, c), m.reshape(-1, f), (((0,), (0,)), ((), ()))) for t, m in zip(taps, ms)])
    return jnp.dot(jnp.asarray(_GG.T, x.dtype), us.reshape(16, c * f)).reshape(3, 3, c, f)

_old = _wgrad_impl
def _wgrad_impl2(x, g, *, conv):
    if isinstance(conv, WinogradDot):
        return _wgrad_dot(x, g)
    return _old(x, g, conv=conv)
_wgrad_impl = _wgrad_impl2
wgrad_p.def_impl(lambda x, g, conv: jax.jit(_wgrad_impl2, static_argnames="conv")(x, g, conv=conv))
mlir.register_lowering(wgrad_p, mlir.lower_fun(_wgrad_impl2, multiple_results=False))
batching.primitive_batchers[wgrad_p] = _batch(_wgrad_impl2)


# The float64 check used (against LaxConv), run as a script with /tmp/dn on sys.path:
# import jax, jax.numpy as jnp, numpy as np
# jax.config.update("jax_enable_x64", True)
# import sys; sys.path.insert(0, "/tmp/dn")
# from ruled import Ruled, WinogradDot
# from maml.nn.layers import LaxConv, Winograd, Im2Col
# r = np.random.RandomState(0)
# x = jnp.asarray(r.randn(3, 6, 5, 4)); w = jnp.asarray(r.randn(3, 3, 4, 2)); v = jnp.asarray(r.randn(3,3,4,2)); vx=jnp.asarray(r.randn(3,6,5,4))
# for inner in [WinogradDot(), Winograd()]:
#     a, b = Ruled(inner), LaxConv()
#     f = lambda c: (lambda x, w: jnp.sum(jnp.sin(c(x, w))**2 * c(x, w * 0.5)))
#     for name, F in [("val", lambda c: f(c)(x, w)),
#                     ("grad", lambda c: jax.grad(f(c), (0, 1))(x, w)),
#                     ("hvp fwd-over-rev", lambda c: jax.jvp(lambda w: jax.grad(f(c), 1)(x, w), (w,), (v,))[1]),
#                     ("rev-over-rev", lambda c: jax.grad(lambda w: jnp.sum(jax.grad(f(c), (0, 1))(x, w)[0] ** 2))(w)),
#                     ("third", lambda c: jax.grad(lambda x: jnp.sum(jax.jvp(lambda w: jax.grad(f(c), 1)(x, w), (w,), (v,))[1]**2))(x)),
#                     ("vmap grad", lambda c: jax.vmap(jax.grad(f(c), 1), (0, None))(jnp.stack([x, x+1]), w)),
#                     ("grad vmap", lambda c: jax.grad(lambda w: jnp.sum(jax.vmap(f(c), (None, 0))(x, jnp.stack([w, w*2]))))(w)),
#                     ]:
#         ra, rb = F(a), F(b)
#         err = max(float(jnp.max(jnp.abs(p - q)) / (1e-30 + jnp.max(jnp.abs(q)))) for p, q in zip(jax.tree.leaves(ra), jax.tree.leaves(rb)))
#         print(type(inner).__name__, name, f"{err:.1e}")
