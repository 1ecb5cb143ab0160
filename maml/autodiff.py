"""The seed notebook's higher-order autodiff tools as a public API (all work over pytrees), and the two
ways of forming a Hessian-vector product as values (`ForwardOverReverse`, `ReverseOverReverse`) that the
implicit meta-gradient and the curvature diagnostics take."""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

jacfwd = jax.jacfwd  # forward mode: efficient for tall Jacobians (more outputs than inputs)
jacrev = jax.jacrev  # reverse mode: efficient for wide Jacobians (more inputs than outputs)


def hessian(f: Callable[..., Array]) -> Callable[..., PyTree]:
    """Dense Hessian of `f` w.r.t. its first argument, forward-over-reverse (`jacfwd(jacrev(f))`).

    For a pytree input the result is a pytree of pytrees (block `[i][j]` = d2f / dx_i dx_j); for a
    vector-valued `f` of output shape `o` and input shape `n`, the shape is `o + n + n`.
    """
    return jax.jacfwd(jax.jacrev(f))


def hvp(f: Callable[[PyTree], Float[Array, ""]], x: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product `H(x) v` of scalar `f` at `x`, forward-over-reverse; `v` shaped like `x`."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def hvp_reverse(f: Callable[[PyTree], Float[Array, ""]], x: PyTree, v: PyTree) -> PyTree:
    """`H(x) v` by reverse-over-reverse, the notebook's form: `grad(lambda x: <grad f(x), v>)(x)`."""
    dot = lambda x: sum(jnp.vdot(g, w) for g, w in zip(jax.tree.leaves(jax.grad(f)(x)), jax.tree.leaves(v)))
    return jax.grad(dot)(x)


def straight_through(f: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """`f` in the forward pass, identity in the backward pass (straight-through estimator).

    `x - stop_gradient(x)` is exactly zero with gradient one (Sterbenz), added to `stop_gradient(f(x))`.
    """

    def g(x):
        zero = x - jax.lax.stop_gradient(x)
        return zero + jax.lax.stop_gradient(f(x))

    return g


def td0_loss(
    value_fn: Callable[[PyTree, Array], Float[Array, ""]],
    theta: PyTree,
    s_tm1: Array,
    r_t: Float[Array, ""],
    s_t: Array,
) -> Float[Array, ""]:
    """TD(0) pseudo-loss `-1/2 (stop_gradient(r_t + v(s_t)) - v(s_tm1))^2`.

    Its gradient w.r.t. `theta` is the TD(0) update `(r_t + v(s_t) - v(s_tm1)) * grad v(s_tm1)`: the
    target's dependence on `theta` is ignored.
    """
    target = r_t + value_fn(theta, s_t)
    return -0.5 * (jax.lax.stop_gradient(target) - value_fn(theta, s_tm1)) ** 2


# ---------------------------------------------------------------- Hessian-vector product modes


def _sub_jaxprs(value: Any):
    """The jaxprs inside an equation parameter (a jaxpr, a closed jaxpr, or a sequence of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _calls_custom_vjp(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("custom_vjp_call"):
            return True
        if any(_calls_custom_vjp(sub) for p in eqn.params.values() for sub in _sub_jaxprs(p)):
            return True
    return False


def forward_mode_blocked(fn: Callable[[PyTree], PyTree], x: PyTree) -> bool:
    """Whether `jax.jvp(fn, (x,), ...)` is impossible: `fn` calls a `jax.custom_vjp` function, which JAX
    cannot differentiate forward. For `fn = jax.grad(f)` (forward-over-reverse) that happens when a custom
    VJP's backward pass itself calls a custom VJP. Decided from `fn`'s jaxpr, traced on shapes only."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)
    return _calls_custom_vjp(jax.make_jaxpr(fn)(shapes).jaxpr)


class AbstractHVPMode(eqx.Module):
    """How `H v` is differentiated: a value passed in."""

    @abc.abstractmethod
    def choose(self, blocked: Callable[[], bool], forward: Callable, reverse: Callable) -> Callable:
        """`forward` or `reverse` (two implementations of one product); `blocked()` says whether forward
        mode is impossible there (see `forward_mode_blocked`)."""

    def linear_map(self, f: Callable[[PyTree], Float[Array, ""]], x: PyTree) -> Callable[[PyTree], PyTree]:
        """`v -> H(x) v` for scalar `f` of the array pytree `x`; `v` shaped like `x`."""
        return self.choose(lambda: forward_mode_blocked(jax.grad(f), x), lambda v: hvp(f, x, v),
                           lambda v: hvp_reverse(f, x, v))


class ReverseOverReverse(AbstractHVPMode):
    """`grad(x -> <grad f(x), v>)`: works through `custom_vjp`; keeps the whole backward pass alive."""

    def choose(self, blocked, forward, reverse):
        return reverse


class ForwardOverReverse(AbstractHVPMode):
    """`jvp(grad f)`: the cheapest HVP (about 2-4 gradients). Impossible where forward mode meets a
    `jax.custom_vjp` (`forward_mode_blocked`); then, with `fallback`, warn and use reverse-over-reverse,
    else raise ValueError."""

    fallback: bool = eqx.field(static=True, default=True)

    def choose(self, blocked, forward, reverse):
        if not blocked():
            return forward
        msg = ("forward-over-reverse is blocked by a jax.custom_vjp inside f (JAX cannot differentiate it "
               "forward); {} reverse-over-reverse (pass mode=ReverseOverReverse() to choose it explicitly)")
        if not self.fallback:
            raise ValueError(msg.format("and fallback=False forbids"))
        warnings.warn(msg.format("falling back to"), stacklevel=3)
        return reverse
