"""Extreme eigenvalues of a curvature operator by Lanczos with full reorthogonalisation, with Ritz bounds."""

from __future__ import annotations

import abc
from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from .krylov import lanczos, ritz
from .operators import AbstractCurvature, ScalarFn, flat_operator, short


class AbstractWhich(eqx.Module):
    """Which end of the spectrum `top_eigenvalues` returns."""

    @abc.abstractmethod
    def order(self, theta: Float[Array, " m"]) -> Array:
        """Indices of the Ritz values `theta`, best first."""


class Largest(AbstractWhich):
    """Largest algebraic eigenvalues, in decreasing order."""

    def order(self, theta):
        return jnp.argsort(-theta)


class Smallest(AbstractWhich):
    """Smallest algebraic eigenvalues (most negative curvature first), in increasing order."""

    def order(self, theta):
        return jnp.argsort(theta)


class LargestMagnitude(AbstractWhich):
    """Eigenvalues of largest absolute value (spectral radius first)."""
    def order(self, theta):
        return jnp.argsort(-jnp.abs(theta))


class Eigenpairs(eqx.Module):
    """`values [k]` (float64 when x64 is on), Ritz residual bounds `residuals [k]` (an eigenvalue lies
    in each `values[i] +- residuals[i]`), `vectors` (params-shaped pytree, leading axis k)."""

    values: Float[Array, " k"]
    residuals: Float[Array, " k"]
    vectors: PyTree
    num_hvps: int = eqx.field(static=True)


def check_num_iters(num_iters: Optional[int], n: int, k: int, what: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"{what}: k={k!r}; expected an integer with 1 <= k <= {n} (the dimension of params)")
    if num_iters is None:
        return min(n, max(2 * k + 10, 30))
    if not isinstance(num_iters, int) or isinstance(num_iters, bool) or not k <= num_iters <= n:
        raise ValueError(f"{what}: num_iters={num_iters!r}; expected an integer with k={k} <= num_iters <= {n} (the dimension)")
    return num_iters


def lanczos_ritz(f, params, *, key: PRNGKeyArray, num_iters: int, mode=ForwardOverReverse()):
    """All `num_iters` Ritz values `[m]` (ascending), their residual bounds `[m]`, the basis `[m, n]`, the
    eigenvectors of T `[m, m]` and `unravel`, from one Lanczos run with a random start."""
    mv, x, unravel = flat_operator(f, params, mode, "lanczos")
    k0, k1 = jax.random.split(key)
    v0 = jax.random.rademacher(k0, x.shape, dtype=x.dtype)
    state = lanczos(mv, v0, num_iters, key=k1)
    theta, bounds, S = ritz(state)
    return theta, bounds, state.basis, S, unravel


def top_eigenvalues(
    f: Union[ScalarFn, AbstractCurvature], params: PyTree, k: int = 1, *, key: PRNGKeyArray,
    num_iters: Optional[int] = None, which: AbstractWhich = Largest(), mode: AbstractHVPMode = ForwardOverReverse(),
) -> Eigenpairs:
    """`k` extreme eigenvalues of the Hessian of `f` (or of a `GaussNewton`) w.r.t. `params`' inexact
    arrays, by `num_iters` Lanczos steps (one HVP each; default `min(n, max(2k + 10, 30))`)."""
    n = ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[0].size
    m = check_num_iters(num_iters, n, k, "top_eigenvalues")
    if not isinstance(which, AbstractWhich):
        raise ValueError(f"top_eigenvalues: which={short(which)}; expected Largest(), Smallest() or LargestMagnitude()")
    theta, bounds, Q, S, unravel = lanczos_ritz(f, params, key=key, num_iters=m, mode=mode)
    idx = which.order(theta)[:k]
    vecs = (S[:, idx].astype(Q.dtype).T @ Q)  # [k, n]
    return Eigenpairs(theta[idx], bounds[idx], jax.vmap(unravel)(vecs), m)

