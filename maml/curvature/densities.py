"""Spectral densities of a curvature operator by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from .krylov import gauss_quadrature, lanczos
from .operators import AbstractCurvature, ScalarFn, flat_operator


class SpectralDensity(eqx.Module):
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density (normalised to integrate to 1).

    `grid [G]`, `density [G]` (Gaussian-smoothed, width `sigma`), the quadrature `nodes [P, m]` and
    `weights [P, m]` per probe (each row sums to 1), `negative_mass` (fraction of eigenvalues below
    `-negative_tol * max|node|`, from the quadrature, not the smoothing; the default tolerance
    sqrt(eps) of the HVP dtype keeps a float32 null space's rounding noise out)."""

    grid: Float[Array, " G"]
    density: Float[Array, " G"]
    nodes: Float[Array, "P m"]
    weights: Float[Array, "P m"]
    negative_mass: Float[Array, ""]
    sigma: Float[Array, ""]

    def moment(self, p: int) -> Float[Array, ""]:
        """Estimate of `tr(H^p) / n` (exact per probe for p < 2m)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=-1))


def spectral_density(
    f: Union[ScalarFn, AbstractCurvature], params: PyTree, *, key: PRNGKeyArray, num_probes: int = 8,
    num_iters: int = 64, num_points: int = 256, bandwidth: float = 0.01, grid: Optional[Float[Array, " G"]] = None,
    negative_tol: Optional[float] = None, mode: AbstractHVPMode = ForwardOverReverse(),
) -> SpectralDensity:
    """SLQ over `num_probes` Rademacher probes x `num_iters` Lanczos steps (vmapped over probes).

    `sigma = bandwidth * (max node - min node)`; the default grid spans the nodes +- 5 sigma (pass a
    fixed `grid` to compare tasks)."""
    mv, x, _ = flat_operator(f, params, mode, "spectral_density")
    n = x.size
    if not isinstance(num_iters, int) or not 1 <= num_iters <= n:
        raise ValueError(f"spectral_density: num_iters={num_iters!r}; expected an integer with 1 <= num_iters <= {n} (the dimension)")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"spectral_density: num_probes={num_probes!r}; expected an integer >= 1")

    def one(k):
        k0, k1 = jax.random.split(k)
        v0 = jax.random.rademacher(k0, (n,), dtype=x.dtype)
        return gauss_quadrature(lanczos(mv, v0, num_iters, key=k1))

    nodes, weights = jax.vmap(one)(jax.random.split(key, num_probes))
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    sigma = bandwidth * jnp.maximum(hi - lo, jnp.maximum(jnp.abs(hi), 1e-12))
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    grid = jnp.asarray(grid, nodes.dtype)
    z = (grid[:, None, None] - nodes[None]) / sigma
    density = jnp.mean(jnp.sum(weights * jnp.exp(-0.5 * z**2), axis=-1), axis=-1) / (sigma * jnp.sqrt(2 * jnp.pi))
    tol = float(jnp.finfo(x.dtype).eps) ** 0.5 if negative_tol is None else negative_tol
    thresh = tol * jnp.max(jnp.abs(nodes))
    negative = jnp.mean(jnp.sum(jnp.where(nodes < -thresh, weights, 0.0), axis=-1))
    return SpectralDensity(grid, density, nodes, weights, negative, sigma)
