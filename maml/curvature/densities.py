"""Spectral densities of a curvature operator by stochastic Lanczos quadrature (SLQ), with standard errors
over the probes.

The negative mass is the smoothed density's mass below `-negative_cut x sigma`: each eigenvalue `lam`
counts `Phi(-(lam + negative_cut sigma) / sigma)` (`Phi` the standard normal CDF, `sigma` the density's
smoothing width). It is 1 well below the cut, 1/2 at it and `Phi(-3) = 0.13%` at zero for the default cut
of 3, so a null space (and its float32 rounding) stays out, and it changes continuously as a Ritz node
moves: no single node near zero decides it. A sharp count of the eigenvalues below `-tol` cannot be read
off a few Lanczos steps: the heavy node representing the bulk near zero falls on either side of `-tol`
from one step count to the next (benchmarks/RESULTS.md, section 4).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from .krylov import gauss_quadrature, lanczos
from .operators import AbstractCurvature, ScalarFn, flat_operator


def _mean_stderr(y: Float[Array, "P ..."]) -> tuple[Array, Array]:
    """Mean over the leading (probe) axis and its standard error (NaN with a single probe)."""
    if y.shape[0] < 2:
        return y[0], jnp.full(y.shape[1:], jnp.nan, y.dtype)
    return jnp.mean(y, axis=0), jnp.std(y, axis=0, ddof=1) / jnp.sqrt(y.shape[0])


def _smoothed(nodes: Float[Array, "P m"], weights: Float[Array, "P m"], sigma: Float[Array, ""],
              grid: Float[Array, " G"]) -> Float[Array, "P G"]:
    """Each probe's quadrature blurred by a Gaussian of width `sigma`, at the points `grid`."""
    z = (grid[None, :, None] - nodes[:, None, :]) / sigma
    return jnp.sum(weights[:, None, :] * jnp.exp(-0.5 * z**2), axis=-1) / (sigma * jnp.sqrt(2 * jnp.pi))


def _width(lo: Array, hi: Array, bandwidth: float) -> Array:
    return bandwidth * jnp.maximum(hi - lo, jnp.maximum(jnp.abs(hi), 1e-12))


def _check(bandwidth: float, negative_cut: float, what: str) -> None:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < math.inf:
        raise ValueError(f"{what}: bandwidth={bandwidth!r}; expected a positive number (a fraction of the spectrum's span)")
    if isinstance(negative_cut, bool) or not isinstance(negative_cut, (int, float)) or not 0 <= negative_cut < math.inf:
        raise ValueError(f"{what}: negative_cut={negative_cut!r}; expected a number >= 0 (in smoothing widths)")


def negative_fraction(eigenvalues: Float[Array, " n"], *, bandwidth: float = 0.01,
                      negative_cut: float = 3.0) -> Float[Array, ""]:
    """The negative mass of a known spectrum `eigenvalues [n]` (e.g. `numpy.linalg.eigvalsh` of a dense
    Hessian) as `spectral_density` defines it: the mean of `Phi(-(lam + negative_cut sigma) / sigma)`, with
    `sigma = bandwidth * max(max - min, |max|)` of the spectrum. The dense reference of the SLQ estimate."""
    _check(bandwidth, negative_cut, "negative_fraction")
    lam = jnp.asarray(eigenvalues)
    sigma = _width(jnp.min(lam), jnp.max(lam), bandwidth)
    return jnp.mean(ndtr(-(lam + negative_cut * sigma) / sigma))


class SpectralDensity(eqx.Module):
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density (normalised to integrate to 1).

    `nodes [P, m]`, `weights [P, m]`: each probe's Gauss quadrature (each row sums to 1). `sigma`: the
    Gaussian smoothing width. `grid [G]`, `density [G]`, `density_stderr [G]`: the smoothed density and its
    standard error over the P probes. `negative_mass`, `negative_mass_stderr`: the smoothed density's mass
    below `-negative_cut x sigma` (module docstring) and its standard error over the probes. Standard errors
    are NaN with a single probe; they measure the probes' spread, not the quadrature's error (which the
    Lanczos steps bound; benchmarks/RESULTS.md measures both)."""

    grid: Float[Array, " G"]
    density: Float[Array, " G"]
    density_stderr: Float[Array, " G"]
    nodes: Float[Array, "P m"]
    weights: Float[Array, "P m"]
    sigma: Float[Array, ""]
    negative_mass: Float[Array, ""]
    negative_mass_stderr: Float[Array, ""]

    @classmethod
    def from_quadrature(cls, nodes: Float[Array, "P m"], weights: Float[Array, "P m"], *, bandwidth: float = 0.01,
                        grid: Optional[Float[Array, " G"]] = None, num_points: int = 256,
                        negative_cut: float = 3.0) -> "SpectralDensity":
        """The density of P probes' Gauss quadratures (`nodes [P, m]`, `weights [P, m]`, e.g. from
        `gauss_quadrature`): `sigma = bandwidth * max(max node - min node, |max node|)`; the default grid
        spans the nodes +- 5 sigma in `num_points` points."""
        _check(bandwidth, negative_cut, "SpectralDensity.from_quadrature")
        lo, hi = jnp.min(nodes), jnp.max(nodes)
        sigma = _width(lo, hi, bandwidth)
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points) if grid is None else jnp.asarray(grid, nodes.dtype)
        density, density_se = _mean_stderr(_smoothed(nodes, weights, sigma, grid))
        negative, negative_se = _mean_stderr(jnp.sum(weights * ndtr(-(nodes + negative_cut * sigma) / sigma), axis=-1))
        return cls(grid, density, density_se, nodes, weights, sigma, negative, negative_se)

    def at(self, grid: Float[Array, " G"]) -> tuple[Float[Array, " G"], Float[Array, " G"]]:
        """The smoothed density and its standard error over probes at other points `grid [G]`."""
        return _mean_stderr(_smoothed(self.nodes, self.weights, self.sigma, jnp.asarray(grid, self.nodes.dtype)))

    def moment(self, p: int) -> Float[Array, ""]:
        """Estimate of `tr(H^p) / n` (exact per probe for p < 2m)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=-1))


def spectral_density(
    f: Union[ScalarFn, AbstractCurvature], params: PyTree, *, key: PRNGKeyArray, num_probes: int = 4,
    num_iters: int = 15, num_points: int = 256, bandwidth: float = 0.01, grid: Optional[Float[Array, " G"]] = None,
    negative_cut: float = 3.0, mode: AbstractHVPMode = ForwardOverReverse(),
) -> SpectralDensity:
    """SLQ of the Hessian of `f` w.r.t. `params`' inexact arrays (or of a `GaussNewton`) over `num_probes`
    Rademacher probes x `num_iters` Lanczos steps (vmapped over probes).

    `sigma = bandwidth * max(max node - min node, |max node|)`; the default grid spans the nodes +- 5 sigma
    (pass a fixed `grid` to compare tasks). The defaults, 4 x 15, are the smallest that gave a negative mass
    within 0.05 of the dense figure (`negative_fraction`) on every task and probe draw of a 97- and a
    1,761-parameter sinusoid MLP and a 525-parameter Conv4, support loss and meta-objective (float32 HVPs;
    benchmarks/RESULTS.md, section 4): the probes' spread shrinks with the dimension, so small models need
    the most probes."""
    mv, x, _ = flat_operator(f, params, mode, "spectral_density")
    n = x.size
    if not isinstance(num_iters, int) or not 1 <= num_iters <= n:
        raise ValueError(f"spectral_density: num_iters={num_iters!r}; expected an integer with 1 <= num_iters <= {n} (the dimension)")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"spectral_density: num_probes={num_probes!r}; expected an integer >= 1")
    _check(bandwidth, negative_cut, "spectral_density")

    def one(k):
        k0, k1 = jax.random.split(k)
        v0 = jax.random.rademacher(k0, (n,), dtype=x.dtype)
        return gauss_quadrature(lanczos(mv, v0, num_iters, key=k1))

    nodes, weights = jax.vmap(one)(jax.random.split(key, num_probes))
    return SpectralDensity.from_quadrature(nodes, weights, bandwidth=bandwidth, grid=grid, num_points=num_points,
                                           negative_cut=negative_cut)
