"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of a proximal-regularised inner problem.

The inner solver (not differentiated) runs K steps on `L_S(phi) + lam/2 ||phi - theta||^2`, giving `phi*`:
SGD steps (`GradientDescent`, iMAML-GD) or Newton-CG steps (`HessianFree`, iMAML-HF). At an exact
minimiser, `d phi*/d theta = (I + H/lam)^{-1}` with `H` the Hessian of `L_S` at `phi*`, so the
meta-gradient is `(I + H/lam)^{-1} grad L_Q(phi*)`: a linear solve by conjugate gradient on Hessian-vector
products (`maml.ForwardOverReverse` by default), with lineax's `CG`.
Memory is flat in K (nothing of the inner loop is kept for the backward pass).

lineax's CG (checked in 0.1.1): it needs the operator *tagged* positive (or negative) semi-definite and
never checks it; negative curvature (`p^T A p < 0`, when `H` has eigenvalues below `-lam`) silently
continues with a negative step; a near-zero `p^T A p` makes the step NaN, which ends the loop and is
still reported as `successful`. So here a non-finite CG solution is replaced by `b` (first-order iMAML's
direction, `(I + H/lam)^{-1} ~ I`) and the relative residual `||A u - b|| / ||b||` of the returned `u` is
recomputed and reported (`cg_residual`, `cg_breakdown` in `meta_loss_and_aux`). A larger `lam` keeps `A`
definite: on the sinusoid ReLU MLP at initialisation, H has eigenvalues near -9, so lam < ~18 is
indefinite (lam = 2: residuals 0.1-0.2 after 5 CG steps and occasional breakdowns; lam = 20: ~1e-3).

The authors' release (aravindr93/imaml_dev, `matrix_evaluator`) solves a damped system instead:
`A = (1 + cg_damping) I + H / (lam + lam_damping)` with `cg_damping = 1` and `lam_damping = 10` by
default, while the inner problem keeps `lam`. `cg_damping` and `lam_damping` here are that system (both 0,
the default, is the exact implicit gradient above); damping trades exactness for a definite `A`, and its
overall scale `1 / (1 + cg_damping)` is what an Adam outer step ignores.
"""

from __future__ import annotations

import abc
import numbers
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from ..inner import AbstractLearnedRates, AbstractPerStepModel, Adaptation
from .base import AbstractStrategy


def _dot(a: PyTree, b: PyTree) -> Float[Array, ""]:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cg(hv, b: PyTree, scale: float, lam: float, steps: int, rtol: float) -> tuple[PyTree, Array, Array]:
    """`u ~ (scale I + H / lam)^{-1} b` by `steps` CG iterations on `hv` (v -> H v); returns `(u, relative
    residual, breakdown)`, `u = b` where CG broke down (a non-finite solution)."""
    matvec = lambda v: jax.tree.map(lambda a, h: scale * a + h / lam, v, hv(v))
    op = lx.FunctionLinearOperator(matvec, jax.eval_shape(lambda: b), tags=lx.positive_semidefinite_tag)
    solver = lx.CG(rtol=rtol, atol=0.0, max_steps=steps, stabilise_every=None)
    u = lx.linear_solve(op, b, solver, throw=False).value
    breakdown = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(u)]))
    u = jax.tree.map(lambda a, c: jnp.where(breakdown, c, a), u, b)
    r = jax.tree.map(lambda a, c: a - c, matvec(u), b)
    return u, jnp.sqrt(_dot(r, r)) / jnp.sqrt(_dot(b, b)), breakdown


class AbstractProximalSolver(eqx.Module):
    """How the inner problem `min_phi L_S(phi) + lam/2 ||phi - centre||^2` is solved (never differentiated:
    the implicit gradient replaces that): `inner.steps` iterations of the solver from `model`."""

    @abc.abstractmethod
    def __call__(self, inner, model: PyTree, x: Array, y: Array, *, centre: PyTree, lam: float,
                 query: Optional[tuple[Array, Array]] = None) -> Adaptation:
        """The adapted model, the support loss `L_S` before each step `[K]`, the query loss after each `[K]`."""


class GradientDescent(AbstractProximalSolver):
    """`inner.steps` SGD steps of `inner.lr` on the proximal objective (the paper's iMAML-GD). Stable only
    while `inner.lr x (lambda_max(H) + lam) < 2`: nothing in the implicit gradient keeps the meta-learned
    curvature below that (on the sinusoid it grows past it within a few thousand iterations)."""

    def __call__(self, inner, model, x, y, *, centre, lam, query=None):
        return inner.run(model, x, y, inner_gradient=jax.lax.stop_gradient, query=query, proximal=(centre, lam))


class HessianFree(AbstractProximalSolver):
    """`inner.steps` Newton steps on the proximal objective `F` (the paper's iMAML-HF): `phi <- phi - inner.lr
    d`, `d ~ (H + lam I)^{-1} grad F` by `cg_steps` CG iterations on Hessian-vector products (`mode`).
    Invariant to the scale of the curvature, so it does not diverge where gradient descent's fixed step
    does; where CG breaks down or gives no descent direction (`H + lam I` indefinite) the step is
    `grad F / lam`."""

    cg_steps: int = eqx.field(static=True, default=5)
    mode: AbstractHVPMode = ForwardOverReverse()

    def __check_init__(self):
        if not isinstance(self.cg_steps, numbers.Integral) or self.cg_steps < 1:
            raise ValueError(f"HessianFree: cg_steps={self.cg_steps!r}; expected an integer >= 1")

    def __call__(self, inner, model, x, y, *, centre, lam, query=None):
        if inner.lr is None or isinstance(model, (AbstractLearnedRates, AbstractPerStepModel)):
            raise ValueError(f"HessianFree: inner.lr={inner.lr!r} with a {type(model).__name__}; expected a fixed "
                             "Newton step size and a plain network")
        params, frozen = eqx.partition(model, inner.adapt_filter)
        loss = lambda p, bx, by: inner.loss_fn(eqx.combine(p, frozen), bx, by)

        def step(p, _):
            p = jax.lax.stop_gradient(p)
            value, g = jax.value_and_grad(lambda q: loss(q, x, y))(p)
            g = jax.tree.map(lambda a, b, c: a + lam * (b - c), g, p, centre)
            d, _, broke = _cg(self.mode.linear_map(lambda q: loss(q, x, y), p), g, 1.0, lam, self.cg_steps, 0.0)
            ok = ~broke & (_dot(d, g) > 0)  # (I + H/lam) d = g: d / lam is the Newton direction
            p = jax.tree.map(lambda a, u, v: a - inner.lr * jnp.where(ok, u, v) / lam, p, d, g)
            return p, (value,) if query is None else (value, loss(p, *query))

        params, outs = jax.lax.scan(step, params, None, length=inner.steps)
        return Adaptation(eqx.combine(params, frozen), outs[0], outs[1] if query is not None else None)


class Implicit(AbstractStrategy):
    """iMAML's implicit meta-gradient. `lam`: proximal strength (> 0); `cg_steps`: CG iterations (the
    paper uses 5); `cg_rtol`: stop earlier once lineax's relative tolerance is met (0: always `cg_steps`);
    `cg_damping`, `lam_damping` (>= 0): the release's damped system `(1 + cg_damping) I + H / (lam +
    lam_damping)` (both 0: the exact `I + H / lam`); `solver`: how the inner problem is solved
    (`GradientDescent()`, iMAML-GD; `HessianFree(cg_steps)`, iMAML-HF).

    Unsupported (ValueError): a model with learned rates, per-step models, and frozen inexact-array leaves (an
    `adapt_filter` leaving arrays out: `phi*` would depend on them through `L_S`, which is not modelled).
    """

    lam: float = 1.0
    cg_steps: int = eqx.field(static=True, default=5)
    cg_rtol: float = eqx.field(static=True, default=0.0)
    mode: AbstractHVPMode = ForwardOverReverse()
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    solver: AbstractProximalSolver = GradientDescent()

    def __check_init__(self):
        if isinstance(self.lam, numbers.Real) and not self.lam > 0:
            raise ValueError(f"Implicit: lam={self.lam!r}; expected a positive number")
        if not isinstance(self.cg_steps, numbers.Integral) or self.cg_steps < 1:
            raise ValueError(f"Implicit: cg_steps={self.cg_steps!r}; expected an integer >= 1")
        if not self.cg_rtol >= 0:
            raise ValueError(f"Implicit: cg_rtol={self.cg_rtol!r}; expected a number >= 0")
        for field in ("cg_damping", "lam_damping"):
            value = getattr(self, field)
            if isinstance(value, numbers.Real) and not value >= 0:
                raise ValueError(f"Implicit: {field}={value!r}; expected a number >= 0")

    def inner_gradient(self, grads: PyTree) -> PyTree:
        return jax.lax.stop_gradient(grads)

    def _split(self, inner, model):
        if isinstance(model, AbstractLearnedRates):
            raise ValueError(f"Implicit: model is a {type(model).__name__}; iMAML does not differentiate inner "
                             "learning rates")
        if isinstance(model, AbstractPerStepModel):
            raise ValueError(
                f"Implicit: model is a per-step model ({type(model).__name__}); the proximal inner problem "
                "must be one fixed objective"
            )
        params, frozen = eqx.partition(model, inner.adapt_filter)
        if jax.tree.leaves(eqx.filter(frozen, eqx.is_inexact_array)):
            raise ValueError(
                "Implicit: inner.adapt_filter leaves inexact arrays frozen; iMAML needs every inexact array "
                "to adapt (an ANIL-style filter is unsupported)"
            )
        frozen_arrays, frozen_static = eqx.partition(frozen, eqx.is_array)
        return params, frozen_arrays, frozen_static

    def solve(self, inner, phi: PyTree, frozen: PyTree, x: Array, y: Array, b: PyTree) -> tuple[PyTree, Array, Array]:
        """`u ~ A^{-1} b`, `A = (1 + cg_damping) I + H / (lam + lam_damping)` (`I + H/lam` undamped) with `H`
        the Hessian of the support loss at `phi` (arrays pytree, the adapted leaves). Returns `(u, relative
        residual ||A u - b|| / ||b||, breakdown)`; on a CG breakdown (non-finite solution) `u = b`,
        first-order iMAML's direction, and `breakdown` is True."""
        f = lambda p: inner.loss_fn(eqx.combine(p, frozen), x, y)
        return _cg(self.mode.linear_map(f, phi), b, 1.0 + self.cg_damping, self.lam + self.lam_damping,
                   self.cg_steps, self.cg_rtol)

    def adapt(self, inner, model, x, y, query=None) -> Adaptation:
        params, frozen_arrays, static = self._split(inner, model)

        @jax.custom_vjp
        def phi_star(p, fa, x_, y_, q_):
            # The proximal centre is p itself; nothing here is differentiated (bwd gives the derivative).
            p = jax.lax.stop_gradient(p)
            a = self.solver(inner, eqx.combine(p, fa, static), x_, y_, centre=p, lam=self.lam, query=q_)
            return eqx.filter(a.model, inner.adapt_filter), a.support_losses, a.query_losses

        def fwd(p, fa, x_, y_, q_):
            out = phi_star(p, fa, x_, y_, q_)
            return out, (out[0], fa, x_, y_)

        def bwd(res, cts):
            phi, fa, x_, y_ = res
            u = self.solve(inner, phi, eqx.combine(fa, static), x_, y_, cts[0])[0]
            return u, None, None, None, None

        phi_star.defvjp(fwd, bwd)
        phi, support_losses, query_losses = phi_star(params, frozen_arrays, x, y, query)
        return Adaptation(eqx.combine(phi, frozen_arrays, static), support_losses, query_losses)

    def objective(self, model, task, inner):
        """The query loss at `phi*` (implicit gradient); aux adds `cg_residual` and `cg_breakdown` (from a
        separate solve, pruned from compiled programs that do not use them, e.g. the training step)."""
        a = self.adapt(inner, model, task.support_x, task.support_y)
        query = inner.query_loss(a.model, task.query_x, task.query_y)
        _, frozen_arrays, static = self._split(inner, model)
        phi = jax.lax.stop_gradient(eqx.filter(a.model, inner.adapt_filter))
        frozen = eqx.combine(frozen_arrays, static)
        g = jax.grad(lambda p: inner.query_loss(eqx.combine(p, frozen), task.query_x, task.query_y))(phi)
        _, residual, breakdown = jax.lax.stop_gradient(self.solve(inner, phi, frozen, task.support_x, task.support_y, g))
        return query, {"support_losses": a.support_losses, "cg_residual": residual, "cg_breakdown": breakdown}
