"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of a proximal-regularised inner problem.

The inner loop runs K SGD steps (not differentiated) on `L_S(phi) + lam/2 ||phi - theta||^2`, giving
`phi*`. At an exact minimiser, `d phi*/d theta = (I + H/lam)^{-1}` with `H` the Hessian of `L_S` at
`phi*`, so the meta-gradient is `(I + H/lam)^{-1} grad L_Q(phi*)`: a linear solve by conjugate gradient
on Hessian-vector products (`maml.ForwardOverReverse` by default), with lineax's `CG`.
Memory is flat in K (nothing of the inner loop is kept for the backward pass).

lineax's CG (checked in 0.1.1): it needs the operator *tagged* positive (or negative) semi-definite and
never checks it; negative curvature (`p^T A p < 0`, when `H` has eigenvalues below `-lam`) silently
continues with a negative step; a near-zero `p^T A p` makes the step NaN, which ends the loop and is
still reported as `successful`. So here a non-finite CG solution is replaced by `b` (first-order iMAML's
direction, `(I + H/lam)^{-1} ~ I`) and the relative residual `||A u - b|| / ||b||` of the returned `u` is
recomputed and reported (`cg_residual`, `cg_breakdown` in `meta_loss_and_aux`). A larger `lam` keeps `A`
definite: on the sinusoid ReLU MLP at initialisation, H has eigenvalues near -9, so lam < ~18 is
indefinite (lam = 2: residuals 0.1-0.2 after 5 CG steps and occasional breakdowns; lam = 20: ~1e-3).
"""

from __future__ import annotations

import numbers

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


class Implicit(AbstractStrategy):
    """iMAML's implicit meta-gradient. `lam`: proximal strength (> 0); `cg_steps`: CG iterations (the
    paper uses 5); `cg_rtol`: stop earlier once lineax's relative tolerance is met (0: always `cg_steps`).

    Unsupported (ValueError): a model with learned rates, per-step models, and frozen inexact-array leaves (an
    `adapt_filter` leaving arrays out: `phi*` would depend on them through `L_S`, which is not modelled).
    """

    lam: float = 1.0
    cg_steps: int = eqx.field(static=True, default=5)
    cg_rtol: float = eqx.field(static=True, default=0.0)
    mode: AbstractHVPMode = ForwardOverReverse()

    def __check_init__(self):
        if isinstance(self.lam, numbers.Real) and not self.lam > 0:
            raise ValueError(f"Implicit: lam={self.lam!r}; expected a positive number")
        if not isinstance(self.cg_steps, numbers.Integral) or self.cg_steps < 1:
            raise ValueError(f"Implicit: cg_steps={self.cg_steps!r}; expected an integer >= 1")
        if not self.cg_rtol >= 0:
            raise ValueError(f"Implicit: cg_rtol={self.cg_rtol!r}; expected a number >= 0")

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
        """`u ~ (I + H/lam)^{-1} b` with `H` the Hessian of the support loss at `phi` (arrays pytree, the
        adapted leaves). Returns `(u, relative residual ||(I + H/lam) u - b|| / ||b||, breakdown)`; on a
        CG breakdown (non-finite solution) `u = b`, first-order iMAML's direction, and `breakdown` is True."""
        f = lambda p: inner.loss_fn(eqx.combine(p, frozen), x, y)
        hv = self.mode.linear_map(f, phi)
        matvec = lambda v: jax.tree.map(lambda a, h: a + h / self.lam, v, hv(v))
        structure = jax.eval_shape(lambda: b)
        op = lx.FunctionLinearOperator(matvec, structure, tags=lx.positive_semidefinite_tag)
        solver = lx.CG(rtol=self.cg_rtol, atol=0.0, max_steps=self.cg_steps, stabilise_every=None)
        u = lx.linear_solve(op, b, solver, throw=False).value
        breakdown = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(u)]))
        u = jax.tree.map(lambda a, c: jnp.where(breakdown, c, a), u, b)
        r = jax.tree.map(lambda a, c: a - c, matvec(u), b)
        return u, jnp.sqrt(_dot(r, r)) / jnp.sqrt(_dot(b, b)), breakdown

    def adapt(self, inner, model, x, y, query=None) -> Adaptation:
        params, frozen_arrays, static = self._split(inner, model)

        @jax.custom_vjp
        def phi_star(p, fa, x_, y_, q_):
            # The proximal centre is p itself; nothing here is differentiated (bwd gives the derivative).
            p = jax.lax.stop_gradient(p)
            a = inner.run(eqx.combine(p, fa, static), x_, y_, inner_gradient=self.inner_gradient, query=q_,
                          proximal=(p, self.lam))
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
