"""Curvature diagnostics against dense references on small models (float64 unless said otherwise).
experiments.curvature on real runs: tests/test_curvature_experiment.py."""

from __future__ import annotations

import functools
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import maml
from maml import InnerLoop, Task
from maml import nn as losses
from maml.nn import MLP
from maml import curvature as C
from maml.curvature import dot_pair, gauss_quadrature, lanczos
from maml.curvature import meta_objective, support_objective, task_curvature


# Tests compile many small programs: a lower XLA backend optimisation level compiles about a third faster.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def _regression(hidden=(8, 8), seed=0, n=20):
    model = _f64(MLP(1, 1, hidden, jnp.tanh, key=jax.random.key(seed)))
    xs = jnp.linspace(-3.0, 3.0, n)[:, None]
    f = lambda m: jnp.mean((jax.vmap(m)(xs) - jnp.sin(xs)) ** 2)
    return model, f


def _dense_reference(f, model):
    """Dense Hessian by reverse-over-reverse on the flat parameters (independent of maml.curvature)."""
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)
    return np.asarray(_jit(jax.jacrev(jax.jacrev(lambda u: f(eqx.combine(unravel(u), static)))))(x)), unravel


_CACHE: dict = {}


def _shared_problem():
    """The 97-parameter regression problem and its dense Hessian, computed once per session."""
    if "H" not in _CACHE:
        model, f = _regression()
        _CACHE["problem"] = (model, f)
        _CACHE["H"] = _dense_reference(f, model)
    return (*_CACHE["problem"], *_CACHE["H"])


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))


MODES = (maml.ForwardOverReverse(), maml.ReverseOverReverse())


def test_hvp_equals_dense_hessian_times_v(x64):
    model, f, H, unravel = _shared_problem()
    v = jax.random.normal(jax.random.key(1), (H.shape[0],), jnp.float64)
    run = _jit(lambda m, v: [(C.hvp(f, m, v, mode=mode), C.dense(f, m, mode=mode)) for mode in MODES])
    for hv, dense in run(model, unravel(v)):  # both modes
        assert _rel(ravel_pytree(hv)[0], H @ np.asarray(v)) < 1e-12
        assert _rel(dense, H) < 1e-12


def _nested_custom_vjp():
    @jax.custom_vjp
    def cos(x):
        return jnp.cos(x)

    cos.defvjp(lambda x: (jnp.cos(x), x), lambda x, g: (-g * jnp.sin(x),))

    @jax.custom_vjp
    def sin(x):  # its backward pass calls another custom_vjp: forward-over-reverse cannot see through it
        return jnp.sin(x)

    sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * cos(x),))
    return lambda p: jnp.sum(sin(p["w"]) ** 2 * p["b"])


def test_forward_mode_blocked_by_custom_vjp_falls_back(x64):
    f = _nested_custom_vjp()
    p = {"w": jnp.array([0.3, 0.7, 1.1]), "b": jnp.array(1.5)}
    v = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
    with pytest.warns(UserWarning, match="forward-over-reverse is blocked by a jax.custom_vjp"):
        got = C.hvp(f, p, v)
    H, unravel = _dense_reference(f, p)
    assert _rel(ravel_pytree(got)[0], H @ np.asarray(ravel_pytree(v)[0])) < 1e-12
    with pytest.raises(ValueError, match="fallback=False forbids"):
        C.hvp(f, p, v, mode=maml.ForwardOverReverse(fallback=False))


def test_gauss_newton_equals_dense_jt_h_j(x64):
    model, _ = _regression(hidden=(5,))
    xs = jnp.linspace(-2.0, 2.0, 7)[:, None]
    model_fn = lambda m: jax.vmap(m)(xs)
    loss_fn = lambda out: jnp.mean(jnp.log(jnp.cosh(out - 0.3)))  # convex, non-quadratic
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)
    J = jax.jacrev(lambda u: model_fn(eqx.combine(unravel(u), static)).ravel())(x)
    out = model_fn(model)
    HL = jax.hessian(lambda o: loss_fn(o.reshape(out.shape)))(out.ravel())
    G = np.asarray(J.T @ HL @ J)
    v = unravel(jnp.arange(x.size, dtype=jnp.float64) / x.size)
    run = _jit(lambda m, v: [(C.dense(C.GaussNewton(model_fn, loss_fn, mode), m), C.ggnvp(model_fn, loss_fn, m, v, mode=mode))
                             for mode in MODES])
    for dense, gv in run(model, v):  # both modes (reverse: J v as the transpose of the VJP)
        assert _rel(dense, G) < 1e-12
        assert _rel(ravel_pytree(gv)[0], G @ np.asarray(ravel_pytree(v)[0])) < 1e-12


def test_extreme_eigenvalues_match_eigh(x64):
    model, f, H, _ = _shared_problem()
    w = np.linalg.eigvalsh(H)
    run = _jit(lambda m, key: (
        C.top_eigenvalues(f, m, 3, key=key, num_iters=60),  # fewer steps than the dimension 97
        C.top_eigenvalues(f, m, 3, key=key, num_iters=H.shape[0], which=C.Smallest())))
    top, bottom = run(model, jax.random.key(0))
    for got, want in ((top, w[::-1][:3]), (bottom, w[:3])):
        assert np.max(np.abs(np.asarray(got.values) - want) / np.abs(want)) < 1e-6
        for val, res in zip(np.asarray(got.values), np.asarray(got.residuals)):  # Ritz bound holds
            assert np.min(np.abs(w - val)) <= res + 1e-10 * np.max(np.abs(w))
        vec = ravel_pytree(jax.tree.map(lambda a: a[0], got.vectors))[0]
        assert np.linalg.norm(H @ np.asarray(vec) - got.values[0] * np.asarray(vec)) <= got.residuals[0] + 1e-8


def test_a_nan_model_gives_nan_eigenvalues_not_an_exception():
    """A model gone NaN (a diverged run) gives NaN curvature figures to report, not a LinAlgError."""
    model, f = _regression(hidden=(4,), n=8)
    model = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan) if eqx.is_inexact_array(a) else a, model)
    out = _jit(lambda m, key: C.top_eigenvalues(f, m, 1, key=key, num_iters=5))(model, jax.random.key(0))
    assert np.all(np.isnan(np.asarray(out.values)))


def test_gauss_quadrature_weights_are_exact_for_polynomials(x64):
    model, f = _regression(hidden=(6,))
    H, _ = _dense_reference(f, model)
    v0 = jax.random.normal(jax.random.key(3), (H.shape[0],), jnp.float64)
    m = 5
    nodes, weights = _jit(lambda v0: gauss_quadrature(lanczos(lambda u: jnp.asarray(H) @ u, v0, m, key=jax.random.key(4))))(v0)
    u = np.asarray(v0) / np.linalg.norm(v0)
    for p in range(2 * m):  # Gauss quadrature with m nodes is exact up to degree 2m - 1
        exact = u @ np.linalg.matrix_power(H, p) @ u
        assert abs(np.sum(weights * nodes**p) - exact) <= 1e-9 * np.max(np.abs(H)) ** p * H.shape[0] ** p


def test_slq_moments_and_negative_mass_match_dense_spectrum(x64):
    model, f, H, _ = _shared_problem()
    w = np.linalg.eigvalsh(H)
    n = H.shape[0]
    d, coarse = _jit(lambda m: (
        C.spectral_density(f, m, key=jax.random.key(5), num_probes=64, num_iters=n),
        C.spectral_density(f, m, key=jax.random.key(6))))(model)  # defaults
    assert 0 <= coarse.negative_mass <= 1 and coarse.nodes.shape == (4, 15) and coarse.negative_mass_stderr > 0
    assert abs(np.trapezoid(d.density, d.grid) - 1.0) < 1e-3
    nodes, weights, P = np.asarray(d.nodes), np.asarray(d.weights), 64
    per_probe = lambda g: np.sum(weights * g(nodes), axis=1)
    for p in (1, 2, 3, 4):  # unbiased per probe (Rademacher): within 4 standard errors of tr(H^p)/n
        y = per_probe(lambda t: t**p)
        assert abs(y.mean() - np.mean(w**p)) <= 4 * y.std(ddof=1) / np.sqrt(len(y)) + 1e-12
        assert abs(d.moment(p) - y.mean()) < 1e-10
    # sigma from the nodes' span (here m = n: the nodes are the eigenvalues); each probe's smoothed count
    sigma = 0.01 * (w.max() - w.min())
    assert abs(d.sigma - sigma) < 1e-9 * sigma
    phi = lambda u: 0.5 * np.vectorize(math.erfc)(-u / np.sqrt(2))
    y = per_probe(lambda t: phi(-(t + 3 * sigma) / sigma))
    assert abs(d.negative_mass - y.mean()) < 1e-10 and abs(d.negative_mass_stderr - y.std(ddof=1) / np.sqrt(P)) < 1e-10
    dense = C.negative_fraction(w)
    assert abs(dense - np.mean(phi(-(w + 3 * sigma) / sigma))) < 1e-12
    assert abs(d.negative_mass - dense) <= 4 * d.negative_mass_stderr
    # the density's standard error over probes, and the same density at other points
    z = (np.asarray(d.grid)[None, :, None] - nodes[:, None, :]) / sigma
    curves = np.sum(weights[:, None, :] * np.exp(-0.5 * z**2), axis=-1) / (sigma * np.sqrt(2 * np.pi))
    assert np.allclose(d.density, curves.mean(0), atol=1e-12) and np.allclose(d.density_stderr, curves.std(0, ddof=1) / 8, atol=1e-12)
    again, again_se = d.at(d.grid[::7])
    assert np.allclose(again, d.density[::7], atol=1e-12) and np.allclose(again_se, d.density_stderr[::7], atol=1e-12)
    one = _jit(lambda m: C.spectral_density(f, m, key=jax.random.key(7), num_probes=1, num_iters=5))(model)
    assert np.isnan(one.negative_mass_stderr) and np.all(np.isnan(one.density_stderr))  # one probe: no spread


def test_negative_mass_ignores_a_null_space_and_is_continuous_in_the_nodes(x64):
    """A PSD spectrum with a large null space has no negative mass, and a heavy node near zero moving across
    it changes the figure by little (the definition before counted its whole weight on one side)."""
    lam = np.concatenate([np.zeros(80), np.linspace(0.5, 10.0, 20)])
    assert C.negative_fraction(lam) < 0.0015  # Phi(-3) = 0.00135 of the null space
    with_negatives = np.concatenate([lam, -np.linspace(1.0, 5.0, 25)])
    assert abs(C.negative_fraction(with_negatives) - 25 / 125) < 0.02
    nodes = lambda z: jnp.array([[-5.0, z, 10.0]])
    weights = jnp.array([[0.2, 0.7, 0.1]])
    near = [float(C.SpectralDensity.from_quadrature(nodes(z), weights).negative_mass) for z in (-0.02, 0.0, 0.02)]
    assert max(near) - min(near) < 0.01 and abs(near[1] - 0.2) < 0.01


def test_hutchplusplus_converges_to_exact_trace(x64):
    model, f, H, _ = _shared_problem()
    n, exact = H.shape[0], np.trace(H)
    methods = (C.HutchPlusPlus(3 * n), C.HutchPlusPlus(30), C.HutchPlusPlus(150), C.Hutchinson(100))
    keys = jax.random.split(jax.random.key(0), 4)
    run = _jit(lambda m: [jax.vmap(lambda k: C.trace(f, m, key=k, method=method))(keys) for method in methods])
    full, small, large, hutch = run(model)
    assert np.all(np.abs(full.value - exact) < 1e-9 * np.abs(H).sum()) and np.all(full.stderr == 0)
    assert full.num_hvps == 2 * n  # the sketch spans everything: exact
    for est in (small, large, hutch):
        assert np.all(np.abs(est.value - exact) <= 5 * est.stderr + 1e-9)
    assert np.mean(np.abs(large.value - exact)) < np.mean(np.abs(small.value - exact))


def _unrolled_meta_loss(model, task, lr, steps):
    """Meta-loss with a plain Python loop (independent of InnerLoop's lax.scan)."""
    for _ in range(steps):
        g = jax.grad(losses.mse)(model, task.support_x, task.support_y)
        model = jax.tree.map(lambda a, b: a - lr * b, model, g)
    return losses.mse(model, task.query_x, task.query_y)


def _tasks(b, dtype=jnp.float64):
    x = jax.random.uniform(jax.random.key(7), (b, 10, 1), dtype, -3, 3)
    amp = jnp.linspace(0.5, 2.0, b, dtype=dtype)[:, None, None]
    y = amp * jnp.sin(x + amp)
    return Task(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_hessian_hvp_equals_dense_meta_hessian(x64, steps):
    model = _f64(MLP(1, 1, (4,), jnp.tanh, key=jax.random.key(2)))
    task = jax.tree.map(lambda a: a[0], _tasks(1))
    inner = InnerLoop(losses.mse, steps, 0.1)
    H, unravel = _dense_reference(lambda m: _unrolled_meta_loss(m, task, 0.1, steps), model)
    f, params = meta_objective(model, task, inner)
    v = unravel(jnp.cos(jnp.arange(H.shape[0], dtype=jnp.float64)))
    for got in _jit(lambda p, v: [C.hvp(f, p, v, mode=mode) for mode in MODES])(params, v):
        assert _rel(ravel_pytree(got)[0], H @ np.asarray(ravel_pytree(v)[0])) < 1e-10


def test_task_curvature_vmapped_equals_per_task_dense(x64):
    model = _f64(MLP(1, 1, (4,), jnp.tanh, key=jax.random.key(2)))
    tasks, inner = _tasks(2), InnerLoop(losses.mse, 1, 0.3)
    n = 13
    run = _jit(lambda m, t: task_curvature(
        m, t, inner, key=jax.random.key(0), k=2, num_iters=n, meta_num_iters=n, trace_method=C.HutchPlusPlus(3 * n)))
    got = run(model, tasks)
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)
    for name, obj in (("support", support_objective), ("meta", meta_objective)):
        ref = lambda t, u: obj(eqx.combine(unravel(u), static), t, inner)[0](unravel(u))
        Hs = np.asarray(_jit(jax.vmap(lambda t: jax.jacrev(jax.jacrev(lambda u: ref(t, u)))(x)))(tasks))
        for i, H in enumerate(Hs):
            w = np.linalg.eigvalsh(H)
            assert _rel(getattr(got, f"{name}_top")[i], w[::-1][:2]) < 1e-8
            assert abs(getattr(got, f"{name}_min")[i] - w[0]) < 1e-8 * np.max(np.abs(w))
            assert abs(getattr(got, f"{name}_trace")[i] - np.trace(H)) < 1e-8 * np.abs(H).sum()
    assert _rel(got.inner_stability, 0.3 * got.support_top[:, 0]) < 1e-12
    # vmap over tasks of the public functions equals a loop over tasks with the same keys
    keys = jax.random.split(jax.random.key(9), 2)
    per_task = lambda t, k: C.top_eigenvalues(*support_objective(model, t, inner), 2, key=k, num_iters=9).values
    batched, per = _jit(jax.vmap(per_task))(tasks, keys), _jit(per_task)
    looped = [per(jax.tree.map(lambda a: a[i], tasks), keys[i]) for i in range(2)]
    assert _rel(batched, np.stack(looped)) < 1e-10


def test_bad_input_raises_one_clear_line(x64):
    model, f = _regression(hidden=(3,))
    key = jax.random.key(0)
    cases = [
        (lambda: C.top_eigenvalues(f, model, 11, key=key), r"k=11; expected an integer with 1 <= k <= 10"),
        (lambda: C.top_eigenvalues(f, model, 2, key=key, num_iters=1), r"num_iters=1; expected"),
        (lambda: C.top_eigenvalues(lambda m: jax.vmap(m)(jnp.ones((3, 1))), model, key=key), r"f: returns shape \(3, 1\)"),
        (lambda: C.hvp(f, model, {"w": jnp.ones(3)}), r"hvp: v has 1 leaves .* expected the structure of params"),
        (lambda: C.trace(f, model, key=key, method="hutch++"), r"method='hutch\+\+'"),
        (lambda: C.hvp(f, model, model, mode="forward"), r"mode='forward'"),
        (lambda: C.spectral_density(f, model, key=key, num_iters=4, bandwidth=0.0), r"bandwidth=0.0; expected a positive"),
        (lambda: C.spectral_density(f, model, key=key, num_iters=4, negative_cut=-1), r"negative_cut=-1; expected a number >= 0"),
        (lambda: C.negative_fraction(np.ones(3), bandwidth="wide"), r"negative_fraction: bandwidth='wide'"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_float32_compensated_krylov_scalars():
    """Without x64: alpha/beta are compensated float32 pairs and T's eigenproblem runs in float64 on host."""
    assert not jax.config.jax_enable_x64
    a = jax.random.normal(jax.random.key(0), (20001,)) * jnp.exp(jax.random.normal(jax.random.key(1), (20001,)))
    b = jax.random.normal(jax.random.key(2), (20001,))
    hi, lo = _jit(dot_pair)(a, b)
    exact = np.dot(np.asarray(a, np.float64), np.asarray(b, np.float64))
    scale = np.dot(np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)))
    assert abs(float(hi) + float(lo) - exact) < 1e-12 * scale
    model = MLP(1, 1, (8, 8), jnp.tanh, key=jax.random.key(0))
    xs = jnp.linspace(-3.0, 3.0, 20)[:, None]
    run = _jit(jax.vmap(lambda s, k: C.top_eigenvalues(
        lambda m: jnp.mean((jax.vmap(m)(xs) - s * jnp.sin(xs)) ** 2), model, 2, key=k, num_iters=40).values))
    got = run(jnp.array([1.0, 2.0]), jax.random.split(jax.random.key(3), 2))
    dense = _jit(jax.vmap(lambda s: C.dense(lambda m: jnp.mean((jax.vmap(m)(xs) - s * jnp.sin(xs)) ** 2), model)))
    for i, H in enumerate(np.asarray(dense(jnp.array([1.0, 2.0])), np.float64)):
        w = np.linalg.eigvalsh(H)
        assert got.dtype == jnp.float32 and _rel(got[i], w[::-1][:2]) < 2e-5


@pytest.mark.parametrize("wide", [True, False], ids=["float64", "float32"])
def test_curvature_programs_call_no_lapack_kernel(wide):
    """jaxlib 0.10.2's batched LAPACK kernels deadlock when two run at once on a 2-thread CPU pool (a
    program with three independent batched QRs hung within 2 minutes of calls here), so the compiled
    per-task diagnostics and densities, vmapped over tasks and probes, must not contain one."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", wide)
    try:
        model = MLP(1, 1, (6,), key=jax.random.key(0))
        x = jnp.linspace(-1.0, 1.0, 8)[:, None]
        tasks = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), Task(x, jnp.sin(x), x, jnp.cos(x)))
        inner = InnerLoop(losses.mse, 1, 0.1)

        def programs(model, tasks, key):
            tc = task_curvature(model, tasks, inner, key=key, k=2, num_iters=8, trace_method=C.HutchPlusPlus(9))
            dens = jax.vmap(lambda t, k: C.spectral_density(*meta_objective(model, t, inner), key=k, num_probes=2,
                                                            num_iters=6).density)(tasks, jax.random.split(key, 2))
            return tc, dens

        text = jax.jit(programs).lower(model, tasks, jax.random.key(1)).compile().as_text()
        targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
        assert targets == {"xla_ffi_python_cpu_callback"}, targets  # the host eigh, and nothing from LAPACK
    finally:
        jax.config.update("jax_enable_x64", old)
