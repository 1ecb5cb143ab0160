"""The seed notebook's higher-order autodiff tools as a public API (all work over pytrees)."""

from __future__ import annotations

from typing import Callable

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
