"""Curvature diagnostics for any scalar `f(params)` of a pytree: Hessian- and Gauss-Newton-vector
products, Lanczos eigenvalues with Ritz bounds, Hutchinson / Hutch++ traces, and stochastic Lanczos
quadrature spectral densities; per-task and meta-objective (meta-Hessian) use: `maml.task_curvature`.

Every function differentiates `f` with respect to the inexact-array leaves of `params` (an Equinox
model can be passed as is); other leaves are held fixed. Nothing here jits: callers `eqx.filter_jit`
and `jax.vmap` (over tasks, probes...) as they like; Python ints (`k`, `num_iters`) are static.
"""

from __future__ import annotations

import abc
import warnings
from typing import Callable, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from . import autodiff
from .lanczos import gauss_quadrature, lanczos, ritz, x64_enabled

ScalarFn = Callable[[PyTree], Float[Array, ""]]


def _short(x: object, limit: int = 160) -> str:
    s = repr(x).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- Hessian-vector product modes


class AbstractHVPMode(eqx.Module):
    """How `H v` is differentiated: a value passed in."""

    @abc.abstractmethod
    def __call__(self, f: ScalarFn, x: PyTree, v: PyTree) -> PyTree:
        """`H(x) v` for scalar `f` of the array pytree `x`; `v` shaped like `x`."""


class ReverseOverReverse(AbstractHVPMode):
    """`grad(x -> <grad f(x), v>)`: works through `custom_vjp`; keeps the whole backward pass alive."""

    def __call__(self, f, x, v):
        return autodiff.hvp_reverse(f, x, v)


class ForwardOverReverse(AbstractHVPMode):
    """`jvp(grad f)`: the cheapest HVP (about 2-4 gradients). Forward mode is blocked where a
    `jax.custom_vjp` is differentiated forward (e.g. run eagerly, a custom VJP whose backward pass
    itself calls a custom VJP, as in nested checkpointed loops); then, when `fallback`, warn once and
    use reverse-over-reverse, else raise ValueError."""

    fallback: bool = eqx.field(static=True, default=True)

    def __call__(self, f, x, v):
        return autodiff.hvp(f, x, v)


def _with_fallback(mode: AbstractHVPMode, what: str, forward: Callable, reverse: Callable) -> Callable:
    """`v -> forward(v)`, switching to `reverse` (with one warning) the first time forward mode is
    blocked by a custom_vjp; JAX raises that while tracing (under jit) or running (eagerly)."""
    if not isinstance(mode, AbstractHVPMode):
        raise ValueError(f"mode={_short(mode)}; expected ForwardOverReverse() or ReverseOverReverse()")
    if not isinstance(mode, ForwardOverReverse):
        return reverse
    chosen = [forward]

    def call(v):
        try:
            return chosen[0](v)
        except TypeError as e:
            if chosen[0] is reverse or not ("custom_vjp" in str(e) or "forward-mode" in str(e)):
                raise
            msg = (
                f"{what}: forward-over-reverse is blocked by a jax.custom_vjp inside f ({str(e).splitlines()[0]}); "
                "falling back to reverse-over-reverse (pass mode=ReverseOverReverse() to choose it explicitly)"
            )
            if not mode.fallback:
                raise ValueError(msg.replace("falling back to", "and fallback=False forbids")) from None
            warnings.warn(msg, stacklevel=2)
            chosen[0] = reverse
            return reverse(v)

    return call


# ---------------------------------------------------------------- curvature operators


def _check_scalar(fn: Callable, arg: PyTree, what: str) -> None:
    out = jax.eval_shape(fn, arg)
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        desc = f"shape {out.shape} {out.dtype}" if isinstance(out, jax.ShapeDtypeStruct) else _short(out)
        raise ValueError(f"{what}: returns {desc}; expected a real floating scalar (shape ())")


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
        rev = lambda v: ReverseOverReverse()(fa, arrays, v)
        return _with_fallback(self.mode, "hvp", lambda v: self.mode(fa, arrays, v), rev)


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
        return _with_fallback(self.mode, "ggnvp", fwd, rev)


def _as_operator(f: Union[ScalarFn, AbstractCurvature], mode: AbstractHVPMode) -> AbstractCurvature:
    if isinstance(f, AbstractCurvature):
        return f
    if not callable(f):
        raise ValueError(f"f={_short(f)}; expected a callable params -> scalar or a maml.curvature operator")
    return Hessian(f, mode)


def _check_like(v: PyTree, arrays: PyTree, what: str) -> None:
    sv, sa = jax.tree.structure(v), jax.tree.structure(arrays)
    shapes = lambda t: [tuple(jnp.shape(a)) for a in jax.tree.leaves(t)]
    if sv != sa or shapes(v) != shapes(arrays):
        raise ValueError(
            f"{what}: v has {sv.num_leaves} leaves of shapes {_short(shapes(v), 120)}; expected the "
            f"structure of params' inexact arrays: {sa.num_leaves} leaves of shapes {_short(shapes(arrays), 120)}"
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


def _flat_operator(f, params, mode, what):
    """Flat matvec `[n] -> [n]`, the flat params and `unravel` for an operator or a scalar function."""
    op = _as_operator(f, mode)
    arrays = eqx.filter(params, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)
    if x.size == 0:
        raise ValueError(f"{what}: params has no inexact-array leaves; nothing to differentiate")
    mv = op.linear_map(params)
    return (lambda u: ravel_pytree(mv(unravel(u)))[0].astype(x.dtype)), x, unravel


def dense(f: Union[ScalarFn, AbstractCurvature], params: PyTree, *, mode=ForwardOverReverse()) -> Float[Array, "n n"]:
    """The dense `[n, n]` operator (Hessian of `f`, or a `GaussNewton`) over the raveled inexact arrays
    of `params` (order of `jax.flatten_util.ravel_pytree`); for small models and tests (n HVPs)."""
    mv, x, _ = _flat_operator(f, params, mode, "dense")
    return jax.vmap(mv)(jnp.eye(x.size, dtype=x.dtype))


# ---------------------------------------------------------------- eigenvalues by Lanczos


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


def _num_iters(num_iters: Optional[int], n: int, k: int, what: str) -> int:
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
    mv, x, unravel = _flat_operator(f, params, mode, "lanczos")
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
    m = _num_iters(num_iters, n, k, "top_eigenvalues")
    if not isinstance(which, AbstractWhich):
        raise ValueError(f"top_eigenvalues: which={_short(which)}; expected Largest(), Smallest() or LargestMagnitude()")
    theta, bounds, Q, S, unravel = lanczos_ritz(f, params, key=key, num_iters=m, mode=mode)
    idx = which.order(theta)[:k]
    vecs = (S[:, idx].astype(Q.dtype).T @ Q)  # [k, n]
    return Eigenpairs(theta[idx], bounds[idx], jax.vmap(unravel)(vecs), m)


# ---------------------------------------------------------------- traces


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
        q = jnp.linalg.qr(sketch.T)[0].T  # [s, n], orthonormal rows
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
        raise ValueError(f"trace: method={_short(method)}; expected Hutchinson(...) or HutchPlusPlus(...)")
    mv, x, _ = _flat_operator(f, params, mode, "trace")
    value, se, used = method.estimate(jax.vmap(mv), x.size, x.dtype, key)
    return TraceEstimate(value, se, used)


# ---------------------------------------------------------------- spectral density (SLQ)


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
    mv, x, _ = _flat_operator(f, params, mode, "spectral_density")
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
