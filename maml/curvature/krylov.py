"""Lanczos with full reorthogonalisation on a flat symmetric operator, and its Gauss quadrature.

Works on flat vectors `[n]` (`maml.curvature` ravels pytrees). The basis is stored in the operator's
dtype; the Krylov scalars (alpha, beta) and the tridiagonal eigenproblem are float64:

- with `jax_enable_x64` on, in float64 on device (dots cast the vectors to float64);
- with it off, float64 is unavailable on device, so alpha and beta are computed by compensated dot
  products (each float32 split into two 12-bit halves by bit masking, so every partial product is exact;
  then a pairwise TwoSum tree; Ogita-Rump-Oishi style) and kept as float32 pairs `hi + lo` (about 44 bits).

In both cases the m x m tridiagonal eigenproblem is solved in numpy float64 on the host
(`jax.pure_callback`; under vmap one callback loops over the batch) from `hi + lo`, and the results are
given back in the operator's precision (rounded to float32 once when x64 is off). Jittable and vmappable;
on GPU the callback moves only the 2m Krylov scalars. Not on device: jaxlib 0.10.2's batched LAPACK kernels
(`eigh` under vmap) deadlock when two of them run at once on a small CPU thread pool (see
`maml.curvature.traces.orthonormal_rows`), and the densities run Lanczos vmapped over probes and tasks.

A breakdown (beta <= 10 sqrt(m) eps |T|: an invariant subspace was found, e.g. when `num_iters` reaches
the dimension or the operator has low rank) restarts from a fresh random vector orthogonal to the basis with beta = 0, so T stays a valid
block-tridiagonal projection and no ghost eigenvalues appear.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

Matvec = Callable[[Float[Array, " n"]], Float[Array, " n"]]


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


# ---------------------------------------------------------------- compensated float32 arithmetic


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split12(a: Float[Array, " n"]) -> tuple[Array, Array]:
    """`a = hi + lo` exactly, each half with at most 12 significant bits (mask the low mantissa bits)."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def _sum_pair(x: Float[Array, " n"]) -> tuple[Array, Array]:
    """Compensated sum of a float32 vector as a pair `(hi, lo)`: pairwise TwoSum tree, errors summed."""
    err = jnp.zeros((), x.dtype)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
        s, e = _two_sum(x[0::2], x[1::2])
        err = err + jnp.sum(e)
        x = s
    return _two_sum(x[0], err)


def dot_pair(a: Float[Array, " n"], b: Float[Array, " n"]) -> tuple[Array, Array]:
    """`<a, b>` of float32 vectors as an unevaluated pair `hi + lo`, accurate to about 2^-44 relative."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    ah, al = _split12(a)
    bh, bl = _split12(b)
    return _sum_pair(jnp.concatenate([ah * bh, ah * bl, al * bh, al * bl]))  # every product is exact


def _sqrt_pair(hi, lo):
    """sqrt of `hi + lo` (>= 0) as a pair, one Newton step with an exact square (split products)."""
    s = jnp.sqrt(jnp.maximum(hi, 0.0))
    sh, sl = _split12(s)
    sq_hi, sq_lo = _two_sum(sh * sh, 2 * sh * sl)
    resid = ((hi - sq_hi) - sq_lo + lo) - sl * sl
    corr = jnp.where(s > 0, resid / (2 * jnp.where(s > 0, s, 1.0)), 0.0)
    return _two_sum(s, corr)


# ---------------------------------------------------------------- the Lanczos iteration


class LanczosState(eqx.Module):
    """Output of `lanczos`: basis `Q [m, n]`, T's diagonal `alpha [m]` and off-diagonal `beta [m]`
    (`beta[j]` couples steps j and j+1; `beta[m-1]` is the residual norm of the last step, used by the
    Ritz bounds). `alpha_lo`, `beta_lo` hold the compensated low parts (zeros when x64 is on)."""

    basis: Float[Array, "m n"]
    alpha: Float[Array, " m"]
    beta: Float[Array, " m"]
    alpha_lo: Float[Array, " m"]
    beta_lo: Float[Array, " m"]


def _unit(key: PRNGKeyArray, n: int, dtype) -> Array:
    z = jax.random.rademacher(key, (n,), dtype=dtype)
    return z / jnp.sqrt(jnp.asarray(n, dtype))


def lanczos(matvec: Matvec, v0: Float[Array, " n"], num_iters: int, *, key: PRNGKeyArray) -> LanczosState:
    """`num_iters` Lanczos steps of the symmetric `matvec` from `v0` (`lax.scan`; one matvec per step)."""
    n, dtype = v0.shape[0], v0.dtype
    m = num_iters
    wide = x64_enabled()
    sdtype = jnp.float64 if wide else jnp.float32

    def dot(a, b):
        if wide:
            return jnp.dot(a.astype(jnp.float64), b.astype(jnp.float64), precision="highest"), 0.0
        return dot_pair(a, b)

    def norm(a):
        if wide:
            return jnp.sqrt(dot(a, a)[0]), 0.0
        return _sqrt_pair(*dot_pair(a, a))

    def orthogonalise(Q, w):  # classical Gram-Schmidt, twice ("twice is enough")
        for _ in range(2):
            w = w - Q.T @ jnp.dot(Q, w, precision="highest")
        return w

    q0 = v0 / norm(v0)[0].astype(dtype)
    Q = jnp.zeros((m + 1, n), dtype).at[0].set(q0)
    eps = jnp.finfo(dtype).eps

    def body(carry, j):
        Q, b_prev, anorm = carry
        q, q_prev = Q[j], Q[jnp.maximum(j - 1, 0)]
        w = matvec(q)
        a_hi, a_lo = dot(q, w)
        w = w - a_hi.astype(dtype) * q - b_prev.astype(dtype) * q_prev
        w = orthogonalise(Q, w)
        b_hi, b_lo = norm(w)
        anorm = jnp.maximum(anorm, jnp.abs(a_hi) + b_hi + jnp.abs(b_prev))
        broken = b_hi <= 10 * np.sqrt(m) * eps * anorm

        def restart(_):  # a fresh random direction orthogonal to the basis (only computed on breakdown)
            u = orthogonalise(Q, _unit(jax.random.fold_in(key, j), n, dtype))
            return u / jnp.maximum(jnp.sqrt(jnp.vdot(u, u)), jnp.finfo(dtype).tiny)

        safe_b = jnp.where(broken, 1.0, b_hi).astype(dtype)
        q_next = jax.lax.cond(broken, restart, lambda _: w / safe_b, None)
        b_hi = jnp.where(broken, 0.0, b_hi)
        b_lo = jnp.where(broken, 0.0, b_lo)
        Q = Q.at[j + 1].set(q_next)
        return (Q, b_hi, anorm), (a_hi, b_hi, jnp.asarray(a_lo, sdtype), jnp.asarray(b_lo, sdtype))

    init = (Q, jnp.zeros((), sdtype), jnp.zeros((), sdtype))
    (Q, _, _), (alpha, beta, alpha_lo, beta_lo) = jax.lax.scan(body, init, jnp.arange(m))
    return LanczosState(Q[:m], alpha, beta, alpha_lo, beta_lo)


# ---------------------------------------------------------------- the tridiagonal eigenproblem


def _host_eigh(a_hi, a_lo, b_hi, b_lo):
    """numpy float64 eigh of T rebuilt from the (compensated) pairs; results in the dtype of `a_hi`. A T with a
    non-finite entry (a NaN model or loss) gives NaN values and vectors, as a compiled eigh would, not an
    exception out of the callback."""
    f64 = lambda u: np.asarray(u).astype(np.float64)  # callbacks may receive jax Arrays: go to numpy first
    a = f64(a_hi) + f64(a_lo)
    b = f64(b_hi) + f64(b_lo)
    batch = a.shape[:-1]
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    vals, vecs = [], []
    for ai, bi in zip(a2, b2):
        t = np.diag(ai) + np.diag(bi[:-1], 1) + np.diag(bi[:-1], -1)
        if not np.all(np.isfinite(t)):
            vals.append(np.full(len(ai), np.nan))
            vecs.append(np.full((len(ai), len(ai)), np.nan))
            continue
        w, s = np.linalg.eigh(t)
        vals.append(w)
        vecs.append(s)
    m, dtype = a.shape[-1], np.asarray(a_hi).dtype
    return np.stack(vals).reshape(*batch, m).astype(dtype), np.stack(vecs).reshape(*batch, m, m).astype(dtype)


def tridiagonal_eigh(state: LanczosState) -> tuple[Float[Array, " m"], Float[Array, "m m"]]:
    """Ritz values `theta [m]` (ascending) and eigenvectors `S [m, m]` (columns) of T, computed in float64
    on the host (rounded to float32 when x64 is off)."""
    m, dtype = state.alpha.shape[-1], state.alpha.dtype
    shapes = (jax.ShapeDtypeStruct((m,), dtype), jax.ShapeDtypeStruct((m, m), dtype))
    return jax.pure_callback(
        _host_eigh, shapes, state.alpha, state.alpha_lo, state.beta, state.beta_lo, vmap_method="broadcast_all"
    )


def ritz(state: LanczosState) -> tuple[Array, Array, Array]:
    """Ritz values `[m]`, Ritz residual bounds `[m]` (`|beta_m| |S[m-1, i]|`: each interval
    `theta_i +- bound_i` holds an eigenvalue of the operator) and eigenvectors of T `[m, m]`."""
    theta, S = tridiagonal_eigh(state)
    bounds = jnp.abs(state.beta[-1].astype(S.dtype)) * jnp.abs(S[-1, :])
    return theta, bounds, S


def gauss_quadrature(state: LanczosState) -> tuple[Float[Array, " m"], Float[Array, " m"]]:
    """Gauss quadrature of the spectral measure of `v0`: nodes = Ritz values, weights = squared first
    components of T's eigenvectors (they sum to 1; exact for polynomials of degree < 2m)."""
    theta, S = tridiagonal_eigh(state)
    return theta, S[0, :] ** 2
