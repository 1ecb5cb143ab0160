"""Randomised trace estimates of a curvature operator (Hutchinson, Hutch++), with standard errors."""

from __future__ import annotations

import abc
from typing import Callable, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..autodiff import AbstractHVPMode, ForwardOverReverse
from .krylov import x64_enabled
from .operators import AbstractCurvature, ScalarFn, flat_operator, short


class TraceEstimate(eqx.Module):
    """`value` estimates tr(H); `stderr` its standard error (0 where the estimate is exact)."""

    value: Float[Array, ""]
    stderr: Float[Array, ""]
    num_hvps: int = eqx.field(static=True)


def _mean_se(y: Array) -> tuple[Array, Array]:
    y = y.astype((jnp.float64 if x64_enabled() else jnp.float32))
    if y.shape[0] < 2:
        return jnp.mean(y), jnp.zeros((), y.dtype)
    return jnp.mean(y), jnp.std(y, ddof=1) / jnp.sqrt(y.shape[0])


def orthonormal_rows(a: Float[Array, "s n"]) -> Float[Array, "s n"]:
    """Orthonormal rows spanning (at least) the rows of `a`, by classical Gram-Schmidt, twice ("twice is
    enough"): a row numerically in the span of the earlier ones is its normalised rounding residual, still
    orthogonal to them after the second pass, so `s = n` rows give a basis (Hutch++ needs orthonormality,
    not the span; only an exactly zero residual stays a zero row). Pure JAX, no LAPACK call: jaxlib 0.10.2's batched
    LAPACK kernels deadlock when two of them run at once on a small CPU thread pool (a program with three
    independent batched QRs hung within 2 minutes of calls on 2 cores), and this runs vmapped over tasks."""

    def body(q, i):
        v = a[i]
        for _ in range(2):
            v = v - q.T @ jnp.dot(q, v, precision="highest")  # rows not filled yet are zero
        norm = jnp.sqrt(jnp.vdot(v, v))
        return q.at[i].set(jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0)), None

    return jax.lax.scan(body, jnp.zeros_like(a), jnp.arange(a.shape[0]))[0]


class AbstractTraceEstimator(eqx.Module):
    """A randomised trace estimator using `num_hvps` matrix-vector products."""

    @abc.abstractmethod
    def estimate(self, matmat: Callable, n: int, dtype, key: PRNGKeyArray) -> tuple[Array, Array, int]:
        """`matmat(V [s, n]) -> [s, n]` (rows are matvecs); return (trace, stderr, HVPs used)."""


class Hutchinson(AbstractTraceEstimator):
    """`mean_i z_i^T H z_i` over `num_samples` Rademacher `z_i`; stderr = sample std / sqrt(num)."""

    num_samples: int = eqx.field(static=True, default=100)

    def estimate(self, matmat, n, dtype, key):
        z = jax.random.rademacher(key, (self.num_samples, n), dtype=dtype)
        mean, se = _mean_se(jnp.sum(z * matmat(z), axis=1))
        return mean, se, self.num_samples


class HutchPlusPlus(AbstractTraceEstimator):
    """Hutch++ (Meyer et al. 2021): exact trace on the range of `H S` (s = num_hvps // 3 sketch
    vectors), Hutchinson on the rest; stderr from the Hutchinson part. Exact once s >= n."""

    num_hvps: int = eqx.field(static=True, default=99)

    def estimate(self, matmat, n, dtype, key):
        k1, k2 = jax.random.split(key)
        s = min(max(self.num_hvps // 3, 1), n)
        g = 0 if s == n else max(self.num_hvps - 2 * s, 1)
        sketch = matmat(jax.random.rademacher(k1, (s, n), dtype=dtype))
        q = orthonormal_rows(sketch)  # [s, n]
        exact = jnp.sum((q * matmat(q)).astype((jnp.float64 if x64_enabled() else jnp.float32)))
        if g == 0:
            return exact, jnp.zeros((), exact.dtype), 2 * s
        z = jax.random.rademacher(k2, (g, n), dtype=dtype)
        z = z - (z @ q.T) @ q
        mean, se = _mean_se(jnp.sum(z * matmat(z), axis=1))
        return exact + mean, se, 2 * s + g


def trace(
    f: Union[ScalarFn, AbstractCurvature], params: PyTree, *, key: PRNGKeyArray,
    method: AbstractTraceEstimator = HutchPlusPlus(), mode: AbstractHVPMode = ForwardOverReverse(),
) -> TraceEstimate:
    """Randomised estimate of the trace of the Hessian of `f` w.r.t. `params`' inexact arrays (or of a
    `GaussNewton`), with its standard error; probes are vmapped HVPs."""
    if not isinstance(method, AbstractTraceEstimator):
        raise ValueError(f"trace: method={short(method)}; expected Hutchinson(...) or HutchPlusPlus(...)")
    mv, x, _ = flat_operator(f, params, mode, "trace")
    value, se, used = method.estimate(jax.vmap(mv), x.size, x.dtype, key)
    return TraceEstimate(value, se, used)

