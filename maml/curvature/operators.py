"""Curvature operators of any scalar `f(params)` of a pytree: the Hessian, the generalised Gauss-Newton,
their products with vectors, and the dense matrix (for small models and tests).

Every function differentiates `f` with respect to the inexact-array leaves of `params` (an Equinox
model can be passed as is); other leaves are held fixed. Nothing here jits: callers `eqx.filter_jit`
and `jax.vmap` (over tasks, probes...) as they like. How each product is differentiated is a value
(`maml.ForwardOverReverse()` by default, `maml.ReverseOverReverse()`).
"""

from __future__ import annotations

import abc
from typing import Callable, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from .. import autodiff
from ..autodiff import AbstractHVPMode, ForwardOverReverse, forward_mode_blocked

ScalarFn = Callable[[PyTree], Float[Array, ""]]


def short(x: object, limit: int = 160) -> str:
    """`repr(x)` on one line, cut to `limit` characters (for error messages)."""
    s = repr(x).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."



def _check_scalar(fn: Callable, arg: PyTree, what: str) -> None:
    out = jax.eval_shape(fn, arg)
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        desc = f"shape {out.shape} {out.dtype}" if isinstance(out, jax.ShapeDtypeStruct) else short(out)
        raise ValueError(f"{what}: returns {desc}; expected a real floating scalar (shape ())")


def check_mode(mode: AbstractHVPMode) -> AbstractHVPMode:
    """`mode`, or a ValueError naming it unless it is an HVP mode value."""
    if not isinstance(mode, AbstractHVPMode):
        raise ValueError(f"mode={short(mode)}; expected maml.ForwardOverReverse() or maml.ReverseOverReverse()")
    return mode


class AbstractCurvature(eqx.Module):
    """A symmetric curvature operator of the parameters (Hessian, Gauss-Newton)."""

    @abc.abstractmethod
    def linear_map(self, params: PyTree) -> Callable[[PyTree], PyTree]:
        """Check the operator at `params` once and return `v -> C(params) v` on the inexact arrays of
        `params` (`v` and the result are pytrees shaped like `eqx.filter(params, eqx.is_inexact_array)`)."""


class Hessian(AbstractCurvature):
    """The Hessian of scalar `f(params)`."""

    f: ScalarFn = eqx.field(static=True)
    mode: AbstractHVPMode = ForwardOverReverse()

    def linear_map(self, params):
        arrays, static = eqx.partition(params, eqx.is_inexact_array)
        fa = lambda a: self.f(eqx.combine(a, static))
        _check_scalar(fa, arrays, "f")
        return check_mode(self.mode).linear_map(fa, arrays)


class GaussNewton(AbstractCurvature):
    """The generalised Gauss-Newton `J^T H_L J` of `loss_fn(model_fn(params))`: `J` is the Jacobian of
    `model_fn` (params -> outputs pytree), `H_L` the Hessian of scalar `loss_fn` (outputs -> scalar).
    Positive semi-definite when `loss_fn` is convex (MSE, softmax cross-entropy)."""

    model_fn: Callable[[PyTree], PyTree] = eqx.field(static=True)
    loss_fn: ScalarFn = eqx.field(static=True)
    mode: AbstractHVPMode = ForwardOverReverse()

    def linear_map(self, params):
        arrays, static = eqx.partition(params, eqx.is_inexact_array)
        g = lambda a: self.model_fn(eqx.combine(a, static))
        z, vjp_fn = jax.vjp(g, arrays)
        _check_scalar(self.loss_fn, z, "loss_fn")
        hl = lambda u: autodiff.hvp(self.loss_fn, z, u)
        fwd = lambda v: vjp_fn(hl(jax.jvp(g, (arrays,), (v,))[1]))[0]
        # reverse only: J v as the transpose of the (linear) VJP
        rev = lambda v: vjp_fn(hl(jax.linear_transpose(lambda u: vjp_fn(u)[0], z)(v)[0]))[0]
        return check_mode(self.mode).choose(lambda: forward_mode_blocked(g, arrays), fwd, rev)


def as_operator(f: Union[ScalarFn, AbstractCurvature], mode: AbstractHVPMode) -> AbstractCurvature:
    if isinstance(f, AbstractCurvature):
        return f
    if not callable(f):
        raise ValueError(f"f={short(f)}; expected a callable params -> scalar or a maml.curvature operator")
    return Hessian(f, mode)


def _check_like(v: PyTree, arrays: PyTree, what: str) -> None:
    sv, sa = jax.tree.structure(v), jax.tree.structure(arrays)
    shapes = lambda t: [tuple(jnp.shape(a)) for a in jax.tree.leaves(t)]
    if sv != sa or shapes(v) != shapes(arrays):
        raise ValueError(
            f"{what}: v has {sv.num_leaves} leaves of shapes {short(shapes(v), 120)}; expected the "
            f"structure of params' inexact arrays: {sa.num_leaves} leaves of shapes {short(shapes(arrays), 120)}"
        )


def hvp(f: ScalarFn, params: PyTree, v: PyTree, *, mode: AbstractHVPMode = ForwardOverReverse()) -> PyTree:
    """`H(params) v` for scalar `f`, differentiated w.r.t. the inexact arrays of `params`; `v` (and the
    result) shaped like `eqx.filter(params, eqx.is_inexact_array)`."""
    _check_like(v, eqx.filter(params, eqx.is_inexact_array), "hvp")
    return Hessian(f, mode).linear_map(params)(v)


def ggnvp(model_fn: Callable, loss_fn: ScalarFn, params: PyTree, v: PyTree, *, mode=ForwardOverReverse()) -> PyTree:
    """Gauss-Newton-vector product `J^T H_L J v` of `loss_fn(model_fn(params))` (see `GaussNewton`)."""
    _check_like(v, eqx.filter(params, eqx.is_inexact_array), "ggnvp")
    return GaussNewton(model_fn, loss_fn, mode).linear_map(params)(v)


def flat_operator(f, params, mode, what):
    """Flat matvec `[n] -> [n]`, the flat params and `unravel` for an operator or a scalar function."""
    op = as_operator(f, mode)
    arrays = eqx.filter(params, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)
    if x.size == 0:
        raise ValueError(f"{what}: params has no inexact-array leaves; nothing to differentiate")
    mv = op.linear_map(params)
    return (lambda u: ravel_pytree(mv(unravel(u)))[0].astype(x.dtype)), x, unravel


def dense(f: Union[ScalarFn, AbstractCurvature], params: PyTree, *, mode=ForwardOverReverse()) -> Float[Array, "n n"]:
    """The dense `[n, n]` operator (Hessian of `f`, or a `GaussNewton`) over the raveled inexact arrays
    of `params` (order of `jax.flatten_util.ravel_pytree`); for small models and tests (n HVPs)."""
    mv, x, _ = flat_operator(f, params, mode, "dense")
    return jax.vmap(mv)(jnp.eye(x.size, dtype=x.dtype))

