"""The MAML family (issue 6): every strategy's meta-gradient against central finite differences (float64)
of the quantity it claims to differentiate, ANIL / Reptile / iMAML identities, checkpointed inner loops,
and clear errors for unsupported combinations."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import maml

STEPS, LR = 2, 0.1
# XLA's backend optimisations off: these tiny programs compile about twice as fast (compiling dominates).
FAST = {"xla_backend_optimization_level": 0}


def _jit(fn):
    """`jax.jit` of `fn(*args)` over the array leaves of `args` (others static), compiled with `FAST`."""

    def call(*args):
        arrays, static = eqx.partition(args, eqx.is_array)
        return jax.jit(lambda a: fn(*eqx.combine(a, static)), compiler_options=FAST)(arrays)

    return call


def _task(key, n=6, d=1):
    k1, k2, k3 = jax.random.split(key, 3)
    sx, qx = jax.random.uniform(k1, (n, d), minval=-2, maxval=2), jax.random.uniform(k2, (n, d), minval=-2, maxval=2)
    w = jax.random.normal(k3, (d, 1))
    f = lambda x: jnp.sin(x @ w) + 0.3 * x[:, :1]
    return maml.Task(sx, f(sx), qx, f(qx))


def _mlp(key, hidden=(6, 6)):
    return maml.nn.MLP(1, 1, hidden, jnp.tanh, key=key)


def _fd_check(f, model, grad_fn, key, num=3, eps=1e-5, rtol=1e-6, extra=lambda m: None):
    """`grad_fn(model)` projected on `num` random directions v against central differences
    (f(m + eps v) - f(m - eps v)) / (2 eps); one compiled program. Returns `(grads, extra(model))`."""
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    vs = jax.random.normal(key, (num, flat.size))

    @_jit
    def run(u):
        m = eqx.combine(unravel(u), static)
        fu = lambda w: f(eqx.combine(unravel(w), static))
        fd = (jax.vmap(fu)(u + eps * vs) - jax.vmap(fu)(u - eps * vs)) / (2 * eps)
        g = grad_fn(m)
        return g, vs @ ravel_pytree(eqx.filter(g, eqx.is_inexact_array))[0], fd, extra(m)

    g, proj, fd, out = run(flat)
    np.testing.assert_allclose(proj, fd, rtol=rtol, atol=1e-9)
    return g, out


def _grad_fn(task, inner, strategy):
    return eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner, strategy=strategy))


def _grad(model, task, inner, strategy):
    return _jit(_grad_fn(task, inner, strategy))(model)


def test_anil_fd_and_head_only(x64):
    key = jax.random.PRNGKey(0)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, STEPS, LR, maml.head_filter(model))
    f = lambda m: maml.meta_loss(m, task, inner)
    g, adapted = _fd_check(f, model, _grad_fn(task, inner, maml.SecondOrder()), key,
                           extra=lambda m: inner.adapt(m, task.support_x, task.support_y)[0])
    # ANIL: the inner loop touches only the head; the body is meta-learned (it has a meta-gradient).
    for a, b in zip(adapted.layers[:-1], model.layers[:-1]):
        assert jnp.array_equal(a.weight, b.weight) and jnp.array_equal(a.bias, b.bias)
    assert not jnp.allclose(adapted.layers[-1].weight, model.layers[-1].weight)
    assert float(jnp.abs(g.layers[0].weight).max()) > 0


def test_second_order_unchanged(x64):
    """The default strategy is still exact MAML: one step by hand."""
    key = jax.random.PRNGKey(1)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, 1, LR)

    def by_hand(m):
        g = eqx.filter_grad(lambda mm: maml.nn.mse(mm, task.support_x, task.support_y))(m)
        return maml.nn.mse(eqx.apply_updates(m, jax.tree.map(lambda a: -LR * a, g)), task.query_x, task.query_y)

    got, want = _jit(lambda m: (_grad_fn(task, inner, maml.SecondOrder())(m), eqx.filter_grad(by_hand)(m)))(model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_first_order_fd(x64):
    """FOMAML differentiates theta -> L_Q(theta + delta) with the inner displacement delta held fixed."""
    key = jax.random.PRNGKey(2)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, STEPS, LR)
    adapted, _ = _jit(inner.adapt)(model, task.support_x, task.support_y)
    delta = jax.tree.map(lambda a, b: a - b, eqx.filter(adapted, eqx.is_inexact_array), eqx.filter(model, eqx.is_inexact_array))
    f = lambda m: maml.nn.mse(eqx.apply_updates(m, delta), task.query_x, task.query_y)
    _fd_check(f, model, _grad_fn(task, inner, maml.FirstOrder()), key)


@pytest.mark.parametrize("kind", ["metasgd", "lslr"])
def test_learned_rates_fd(x64, kind):
    key = jax.random.PRNGKey(3)
    net, task = _mlp(key), _task(key)
    if kind == "metasgd":
        model = maml.LearnedLR.per_parameter(net, LR)
    else:
        model = maml.LearnedLR.per_layer(net, LR, steps=STEPS)
        model = eqx.tree_at(lambda m: m.lr, model, jax.tree.map(lambda r: r * jnp.arange(1.0, STEPS + 1), model.lr))
    inner = maml.InnerLoop(maml.nn.mse, STEPS, 123.0)  # lr ignored: the model brings its rates
    g, adapted = _fd_check(lambda m: maml.meta_loss(m, task, inner), model, _grad_fn(task, inner, maml.SecondOrder()),
                           key, extra=lambda m: inner.adapt(m, task.support_x, task.support_y)[0])
    assert all(bool(jnp.all(r != 0)) for r in jax.tree.leaves(g.lr))  # every rate (and step) is learned
    assert isinstance(adapted, maml.LearnedLR)


def test_multi_step_loss(x64):
    w0, w_half, w1 = (maml.msl_weights(4, p) for p in (0.0, 0.5, 1.0))
    np.testing.assert_allclose(w0, jnp.full(4, 0.25))
    np.testing.assert_allclose([float(w_half.sum()), float(w1[-1]), float(w1[:-1].sum())], [1.0, 1.0, 0.0], atol=1e-12)
    assert float(w_half[-1]) > 0.25 > float(w_half[0]) >= 0.03 / 4
    key = jax.random.PRNGKey(4)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, STEPS, LR)
    s = maml.MultiStepLoss(maml.SecondOrder(), anneal_steps=10).at_step(jnp.asarray(3))
    f = lambda m: maml.meta_loss(m, task, inner, strategy=s)
    _, (loss, aux) = _fd_check(f, model, _grad_fn(task, inner, s), key,
                               extra=lambda m: maml.meta_loss_and_aux(m, task, inner, strategy=s))
    np.testing.assert_allclose(loss, jnp.sum(maml.msl_weights(STEPS, 0.3) * aux["query_losses"]), rtol=1e-12)
    np.testing.assert_allclose(aux["query_losses"][-1], maml.meta_loss(model, task, inner), rtol=1e-12)


def test_annealed_order(x64):
    key = jax.random.PRNGKey(5)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, STEPS, LR)
    da = maml.AnnealedOrder(first_order_steps=100)
    grads = _jit(lambda m: [_grad_fn(task, inner, s)(m) for s in (
        da.at_step(jnp.asarray(99)), maml.FirstOrder(), da.at_step(jnp.asarray(100)), maml.SecondOrder())])(model)
    for got, ref in (grads[:2], grads[2:]):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(jax.tree.leaves(grads[1])[0], jax.tree.leaves(grads[3])[0])


class PerStepBNMLP(maml.nn.AbstractBatchModel, maml.AbstractPerStepModel):
    """x [N, 1] -> linear -> batch norm (batch statistics; scale/offset per inner step [S, H]) -> tanh -> linear."""

    w1: jax.Array
    scale: jax.Array
    offset: jax.Array
    w2: jax.Array

    def __init__(self, hidden, steps, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w1, self.w2 = jax.random.normal(k1, (1, hidden)), jax.random.normal(k2, (hidden, 1)) / hidden**0.5
        self.scale = 1.0 + 0.1 * jax.random.normal(k3, (steps, hidden))
        self.offset = jnp.zeros((steps, hidden))

    def at_step(self, step):
        return eqx.tree_at(lambda m: (m.scale, m.offset), self, (self.scale[step], self.offset[step]))

    def __call__(self, x):
        if self.scale.ndim != 1:
            raise ValueError("PerStepBNMLP: call at_step(k) first (per-step arrays are [S, H])")
        h = x @ self.w1
        h = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
        return jnp.tanh(h * self.scale + self.offset) @ self.w2


def test_per_step_batch_norm_fd(x64):
    key = jax.random.PRNGKey(6)
    model, task = PerStepBNMLP(5, STEPS + 1, key=key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, STEPS, LR)
    g, _ = _fd_check(lambda m: maml.meta_loss(m, task, inner), model, _grad_fn(task, inner, maml.SecondOrder()), key,
                     rtol=1e-5)
    used = jnp.abs(g.scale).sum(axis=1)
    assert bool(jnp.all(used[:STEPS] > 0)) and float(used[STEPS]) == 0.0  # step k's row, k < K only


@pytest.mark.slow  # compiling a second-order Conv4 meta-gradient in float64: ~1-1.5 min on 2 busy cores
def test_per_step_conv4_fd(x64):
    """`maml.nn.PerStep` of a Conv4 (MAML++ per-step batch norm) under LSLR, as `--algorithm mamlpp
    --mamlpp-per-step-bn` builds it: the second-order meta-gradient against finite differences; step k's
    support and query losses use row k; at_step views and step 0 match a Conv4 with those rows."""
    from experiments import algorithms as A

    key = jax.random.PRNGKey(14)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    net = maml.nn.PerStep(maml.nn.Conv4(1, 3, 2, 16, key=k1), STEPS + 1)
    assert net.steps == STEPS + 1 and net.model.bn_scales[0].shape == (STEPS + 1, 2)
    # distinct rows, so that using the wrong step's row would show
    net = eqx.tree_at(lambda m: (m.model.bn_scales, m.model.bn_offsets), net, (
        tuple(s + 0.2 * jax.random.normal(jax.random.fold_in(k2, i), s.shape) for i, s in enumerate(net.model.bn_scales)),
        tuple(0.1 * jax.random.normal(jax.random.fold_in(k3, i), o.shape) for i, o in enumerate(net.model.bn_offsets))))
    x = jax.random.uniform(k4, (12, 16, 16, 1))
    y = jnp.arange(12, dtype=jnp.int32) % 3
    task = maml.Task(x[:6], y[:6], x[6:], y[6:])
    plain = maml.nn.Conv4(1, 3, 2, 16, key=k1)
    steps = (0, 1, STEPS, STEPS + 3)  # past the last row: clamped

    def views(n, p):
        with_rows = lambda r: eqx.tree_at(lambda m: (m.bn_scales, m.bn_offsets), p, (
            tuple(s[r] for s in n.model.bn_scales), tuple(o[r] for o in n.model.bn_offsets)))
        return [maml.network(n, jnp.int32(k))(x) for k in steps], [with_rows(min(k, STEPS))(x) for k in steps], n(x)

    got, want, called = _jit(views)(net, plain)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(called, want[0], rtol=1e-12)

    algo = A.MAMLPlusPlus(inner_steps=STEPS, inner_lr=LR, msl=False).build(net, maml.nn.cross_entropy, key=k1)
    assert isinstance(algo.model, maml.LearnedLR) and isinstance(algo.model.model, maml.nn.PerStep)
    inner = algo.inner
    g, _ = _fd_check(lambda m: maml.meta_loss(m, task, inner), algo.model, _grad_fn(task, inner, algo.strategy), key,
                     num=2, rtol=1e-5)
    for scale, offset in zip(g.model.model.bn_scales, g.model.model.bn_offsets):
        used = jnp.abs(scale).sum(axis=1) + jnp.abs(offset).sum(axis=1)
        assert bool(jnp.all(used[:STEPS] > 0)) and float(used[STEPS]) == 0.0  # step k's row, k < K only


def test_reptile_relations(x64):
    key = jax.random.PRNGKey(7)
    model, task = _mlp(key), _task(key)
    same = maml.Task(task.support_x, task.support_y, task.support_x, task.support_y)
    inner = maml.InnerLoop(maml.nn.mse, 2, LR)

    @eqx.filter_jit
    def run(m):
        support_grad = eqx.filter_grad(lambda mm: maml.nn.mse(mm, task.support_x, task.support_y))(m)
        one, two = (_grad_fn(task, inner.with_steps(k), maml.Reptile())(m) for k in (1, 2))
        adapted = inner.adapt(m, task.support_x, task.support_y)[0]
        fo = _grad_fn(same, inner.with_steps(1), maml.FirstOrder())(m)
        values = [maml.meta_loss(m, task, inner, strategy=s) for s in (maml.Reptile(), maml.FirstOrder())]
        return support_grad, one, two, adapted, fo, values

    support_grad, one, two, adapted, fo, values = run(model)
    theta = eqx.filter(model, eqx.is_inexact_array)
    diff = jax.tree.map(lambda a, b: a - b, theta, eqx.filter(adapted, eqx.is_inexact_array))
    # Nichol et al.: k = 1 gives LR * grad L_S(theta); k = 2 adds LR * (FOMAML gradient with query = support).
    for got, want in ((two, diff), (one, jax.tree.map(lambda s: LR * s, support_grad)),
                      (two, jax.tree.map(lambda s, f: LR * (s + f), support_grad, fo))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(values[0], values[1], rtol=1e-12)  # the value is the adapted query loss


@pytest.mark.parametrize("solver", ["gd", "hf"])
def test_imaml_exact_on_quadratic(x64, solver):
    """Linear model + MSE: phi* = theta - (H + lam I)^{-1} grad L_S(theta) in closed form; the inner loop
    reaches it (gradient descent at its optimal step; or one Newton step, its CG exact in 3 iterations on 3
    parameters) and CG (3 iterations) solves exactly: the implicit gradient is exact."""
    key = jax.random.PRNGKey(8)
    model, task, lam = eqx.nn.Linear(2, 1, key=key), _task(key, n=5, d=2), 4.0
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    support = lambda u: maml.nn.mse(eqx.combine(unravel(u), static), task.support_x, task.support_y)
    eig = jnp.linalg.eigvalsh(jax.hessian(support)(flat)) + lam
    if solver == "gd":
        lr = float(2 / (eig[0] + eig[-1]))  # optimal GD step: contraction (k - 1)/(k + 1), k the condition number
        steps = int(np.ceil(np.log(1e-15) / np.log((eig[-1] - eig[0]) / (eig[-1] + eig[0]))))
        inner, strategy = maml.InnerLoop(maml.nn.mse, min(steps, 120), lr), maml.Implicit(lam=lam, cg_steps=3)
    else:
        inner = maml.InnerLoop(maml.nn.mse, 1, 1.0)
        strategy = maml.Implicit(lam=lam, cg_steps=3, solver=maml.HessianFree(cg_steps=3))

    def closed_form(m):
        u = ravel_pytree(eqx.filter(m, eqx.is_inexact_array))[0]
        h = jax.hessian(support)(u)
        phi = u - jnp.linalg.solve(h + lam * jnp.eye(u.size), jax.grad(support)(u))
        return maml.nn.mse(eqx.combine(unravel(phi), static), task.query_x, task.query_y)

    g, (loss, aux, want) = _fd_check(
        closed_form, model, _grad_fn(task, inner, strategy), key,
        extra=lambda m: (*maml.meta_loss_and_aux(m, task, inner, strategy=strategy), eqx.filter_grad(closed_form)(m)))
    np.testing.assert_allclose(loss, closed_form(model), rtol=1e-10)
    assert float(aux["cg_residual"]) < 1e-10 and not bool(aux["cg_breakdown"])
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    # Per-task gradients mapped (Map) and the gradient of the vmapped mean (Vmap) agree.
    tasks = jax.tree.map(lambda *a: jnp.stack(a), task, _task(jax.random.PRNGKey(9), n=5, d=2))
    short = inner.with_steps(3)
    vm, mp = _jit(lambda m: [maml.meta_value_and_grad(m, tasks, short, strategy=strategy, batching=b)
                             for b in (maml.Vmap(), maml.Map())])(model)
    for a, b in zip(jax.tree.leaves(vm), jax.tree.leaves(mp)):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_imaml_indefinite_operator(x64):
    """lineax's CG on a non-PSD I + H/lam raises nothing; its breakdown (p^T A p = 0) gives NaN, which
    `Implicit.solve` replaces by b (first-order direction) and reports."""
    loss = lambda w, x, y: 0.5 * jnp.sum(x[0] * w**2)  # H = diag(x[0]); A = I + H/lam
    inner, s = maml.InnerLoop(loss, 1, 0.1), maml.Implicit(lam=1.0, cg_steps=2)
    x, y, w = jnp.array([[1.0, -5.0]]), jnp.zeros((1,)), jnp.ones(2)  # A = diag(2, -4): indefinite
    solve = jax.jit(lambda b: s.solve(inner, w, None, x, y, b), compiler_options=FAST)
    u, res, broke = solve(jnp.array([1.0, 1.0]))  # no breakdown: exact in 2 steps despite indefiniteness
    np.testing.assert_allclose(u, [0.5, -0.25], rtol=1e-12)
    assert not bool(broke) and float(res) < 1e-12
    b = jnp.array([2.0**0.5, 1.0])  # b^T A b = 0: breakdown
    u, res, broke = solve(b)
    assert bool(broke) and jnp.array_equal(u, b)
    np.testing.assert_allclose(res, jnp.linalg.norm(jnp.array([2.0, -4.0]) * b - b) / jnp.linalg.norm(b))


def test_hessian_free_falls_back_to_a_gradient_step(x64):
    """Where H + lam I is indefinite and CG's direction is no descent direction, the Newton step is replaced
    by grad F / lam; on a definite problem one exact Newton step lands on the minimiser."""
    loss = lambda w, x, y: 0.5 * jnp.sum(x[0] * w**2)  # H = diag(x[0])
    x, y, w, lam = jnp.array([[3.0, -5.0]]), jnp.zeros((1,)), jnp.ones(2), 1.0  # H + lam I = diag(4, -4)
    inner, hf = maml.InnerLoop(loss, 1, 0.5), maml.HessianFree(cg_steps=2)
    out = hf(inner, w, x, y, centre=w, lam=lam)
    # (I + H/lam) d = g has d = (0.75, 1.25) and d.g = -4 < 0: no descent direction, so the step is lr g / lam
    g = x[0] * w
    d = g / (1 + x[0] / lam)
    assert float(d @ g) < 0
    np.testing.assert_allclose(out.model, w - 0.5 * g / lam, rtol=1e-12)
    np.testing.assert_allclose(out.support_losses, [loss(w, x, y)], rtol=1e-12)
    x = jnp.array([[3.0, 5.0]])  # definite: one full Newton step is exact on a quadratic
    out = hf(maml.InnerLoop(loss, 1, 1.0), w, x, y, centre=w, lam=lam)
    np.testing.assert_allclose(out.model, w - (x[0] * w) / (x[0] + lam), rtol=1e-12)


def test_imaml_damped_system(x64):
    """The release's damped system: `solve` returns `((1 + c) I + H / (lam + d))^{-1} b` (dense reference;
    CG exact in as many steps as parameters), and the meta-gradient is that solve applied to the query
    gradient at phi*."""
    key = jax.random.PRNGKey(12)
    model, task = eqx.nn.Linear(2, 1, key=key), _task(key, n=5, d=2)
    inner = maml.InnerLoop(maml.nn.mse, 4, 0.1)
    strategy = maml.Implicit(lam=2.0, cg_steps=3, cg_damping=1.0, lam_damping=10.0)
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    support = lambda u: maml.nn.mse(eqx.combine(unravel(u), static), task.support_x, task.support_y)
    phi = strategy.adapt(inner, model, task.support_x, task.support_y).model
    phi_flat = ravel_pytree(eqx.filter(phi, eqx.is_inexact_array))[0]
    a = 2.0 * jnp.eye(flat.size) + jax.hessian(support)(phi_flat) / 12.0
    query_grad = jax.grad(lambda u: maml.nn.mse(eqx.combine(unravel(u), static), task.query_x, task.query_y))
    want = jnp.linalg.solve(a, query_grad(phi_flat))
    got = ravel_pytree(eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner, strategy=strategy))(model))[0]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    u, res, broke = strategy.solve(inner, unravel(phi_flat), static, task.support_x, task.support_y,
                                   unravel(query_grad(phi_flat)))
    np.testing.assert_allclose(ravel_pytree(u)[0], want, rtol=1e-10)
    assert float(res) < 1e-10 and not bool(broke)


def test_checkpointed_inner_loop_same_gradient(x64):
    key = jax.random.PRNGKey(10)
    net, task = _mlp(key), _task(key)
    model = maml.LearnedLR.per_layer(net, LR, steps=3)
    plain = maml.InnerLoop(maml.nn.mse, 3, LR)
    loops = [dataclasses.replace(plain, checkpoint_every=n) for n in (0, 1, 2)]
    ref, *others = _jit(lambda m: [_grad_fn(task, l, maml.SecondOrder())(m) for l in loops])(model)
    for got in others:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_unsupported_combinations_raise():
    key = jax.random.PRNGKey(11)
    model, task = _mlp(key), _task(key)
    inner = maml.InnerLoop(maml.nn.mse, 2, LR)
    with pytest.raises(ValueError, match="Implicit: model is a LearnedLR"):
        maml.meta_loss(maml.LearnedLR.per_parameter(model, LR), task, inner, strategy=maml.Implicit())
    with pytest.raises(ValueError, match="adapt_filter leaves inexact arrays frozen"):
        maml.meta_loss(model, task, maml.InnerLoop(maml.nn.mse, 2, LR, maml.head_filter(model)),
                       strategy=maml.Implicit())
    with pytest.raises(ValueError, match="Reptile: model is a LearnedLR"):
        maml.meta_loss(maml.LearnedLR.per_parameter(model, LR), task, inner, strategy=maml.Reptile())
    with pytest.raises(ValueError, match="MultiStepLoss: base=Implicit"):
        maml.MultiStepLoss(maml.Implicit())
    with pytest.raises(ValueError, match="expected >= 1"):
        maml.meta_loss(model, task, inner.with_steps(0), strategy=maml.MultiStepLoss())
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        maml.InnerLoop(maml.nn.mse, 2, LR, checkpoint_every=-1)
    with pytest.raises(ValueError, match="LearnedLR: rates have structure"):
        maml.meta_loss(maml.LearnedLR.per_parameter(model, LR, maml.head_filter(model)), task, inner)
    with pytest.raises(ValueError, match="head_filter: model is a Linear"):
        maml.head_filter(eqx.nn.Linear(2, 2, key=key))
    with pytest.raises(ValueError, match="Implicit: lam=0"):
        maml.Implicit(lam=0)
    with pytest.raises(ValueError, match="HessianFree: inner.lr=None with a LearnedLR"):
        maml.HessianFree()(maml.InnerLoop(maml.nn.mse, 1, None), maml.LearnedLR.per_parameter(model, LR),
                           task.support_x, task.support_y, centre=None, lam=1.0)
    with pytest.raises(ValueError, match="HessianFree: cg_steps=0"):
        maml.HessianFree(0)
    with pytest.raises(ValueError, match="Implicit: lam_damping=-1"):
        maml.Implicit(lam_damping=-1)
    with pytest.raises(ValueError, match="first_order_steps=-1"):
        maml.AnnealedOrder(-1)


def test_algorithm_option():
    from experiments import algorithms as A
    from experiments import cli, sinusoid

    parse = lambda *argv: cli.parse(sinusoid.SinusoidConfig, list(argv), sinusoid.algorithms)
    with pytest.raises(ValueError, match="--algorithm='maml2'; expected one of maml"):
        parse("--algorithm", "maml2")
    with pytest.raises(ValueError, match="--inner-checkpoint is an option of --algorithm maml / anil / metasgd / "
                                         "mamlpp, not of --algorithm imaml"):
        parse("--algorithm", "imaml", "--inner-checkpoint", "2")
    with pytest.raises(ValueError, match="--mamlpp-per-step-bn with a MLP"):
        A.MAMLPlusPlus(per_step_bn=True).build(_mlp(jax.random.PRNGKey(0)), maml.nn.mse, key=jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(12)
    tasks = jax.tree.map(lambda *a: jnp.stack(a), _task(key), _task(jax.random.PRNGKey(13)))
    def settings(cls):
        return dict(inner_steps=2, **({"inner_lr": 0.05} if issubclass(cls, A.FixedRate) else {}),
                    **({"outer_lr": 1e-2} if issubclass(cls, A.AdamOuter) else {}),
                    **({"lambda_": 20.0} if cls is A.IMAML else {}), **({"step_size": 1.0} if cls is A.Reptile else {}))

    algos = [cls(**settings(cls)).build(_mlp(key, (4,)), maml.nn.mse, key=key) for cls in A.ALL]

    def three_steps(algo, state):  # the same training step for every algorithm; 3 meta-iterations
        step = maml.make_train_step(algo.optimizer, algo.inner, strategy=algo.strategy)
        return jax.lax.scan(lambda c, _: step(c, tasks), state, None, length=3)[1]["meta_loss"]

    states = [maml.init_state(algo.model, algo.optimizer, key) for algo in algos]
    losses = _jit(lambda sts: [three_steps(algo, st) for algo, st in zip(algos, sts)])(states)
    for name, l in zip(A.NAMES, losses):
        assert np.all(np.isfinite(l)) and l[-1] < l[0], (name, l)
