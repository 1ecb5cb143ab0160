"""The meta-gradient module: finite differences in float64, first-order closed form, vmap/jit invariance,
batching values, the adapt filter, compile-once train step, and clear errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import maml


def tiny_mlp(key):
    return maml.nn.MLP(1, 1, (5, 4), activation=jnp.tanh, key=key)


def sine_tasks(key, num_tasks=3, shots=6, queries=7):
    from data.sinusoid import sample_tasks

    return sample_tasks(key, num_tasks, shots, queries)[0]


def fd_grad(f, model, eps=1e-6):
    """Central finite differences of scalar f w.r.t. every inexact array of model."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    g = np.zeros(flat.shape)
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        g[i] = (f(eqx.combine(unravel(flat + e), static)) - f(eqx.combine(unravel(flat - e), static))) / (2 * eps)
    return g


def flat_grad(grads):
    return ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))[0]


@pytest.mark.parametrize("steps, unroll", [(1, 4), (3, 4), (1, 0), (3, 0)])
def test_second_order_meta_gradient_matches_finite_differences(x64, steps, unroll):
    """Both forms of the inner loop: traced straight-line (steps <= unroll) and `lax.scan` (unroll=0)."""
    model = tiny_mlp(jax.random.PRNGKey(0))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(1)))
    inner = maml.InnerLoop(maml.nn.mse, steps, 0.05, unroll=unroll)
    f = jax.jit(lambda m: maml.meta_loss(m, task, inner))
    g = flat_grad(eqx.filter_grad(f)(model))
    g_fd = fd_grad(f, model)
    rel = np.linalg.norm(g - g_fd) / np.linalg.norm(g_fd)
    assert rel < 1e-6, rel
    # and the first-order gradient is measurably different (the test can fail)
    g_fo = flat_grad(eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner, strategy=maml.FirstOrder()))(model))
    assert np.linalg.norm(g_fo - g_fd) / np.linalg.norm(g_fd) > 1e-3


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_is_query_gradient_at_adapted_parameters(x64, steps):
    model = tiny_mlp(jax.random.PRNGKey(2))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(3)))
    inner = maml.InnerLoop(maml.nn.mse, steps, 0.05)
    g_fo = eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner, strategy=maml.FirstOrder()))(model)
    adapted = inner.adapt(model, task.support_x, task.support_y)[0]
    closed = eqx.filter_grad(lambda m: maml.nn.mse(m, task.query_x, task.query_y))(adapted)
    np.testing.assert_allclose(flat_grad(g_fo), flat_grad(closed), rtol=1e-12, atol=1e-14)


def test_unrolled_and_scanned_inner_loops_agree(x64):
    model = tiny_mlp(jax.random.PRNGKey(4))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(5)))
    results = []
    for unroll in (0, 5):
        inner = maml.InnerLoop(maml.nn.mse, 5, 0.05, unroll=unroll)
        loss, aux = maml.meta_loss_and_aux(model, task, inner)
        results.append((loss, aux["support_losses"], flat_grad(eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner))(model))))
        kinds = {e.primitive.name for e in jax.make_jaxpr(lambda m: maml.meta_loss(m, task, inner))(model).eqns}
        assert ("scan" in kinds) == (unroll == 0), kinds
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert results[0][1].shape == (5,)


def test_vmap_of_grad_equals_grad_of_vmap_and_batchings_agree(x64):
    model = tiny_mlp(jax.random.PRNGKey(4))
    tasks = sine_tasks(jax.random.PRNGKey(5), num_tasks=4)
    inner = maml.InnerLoop(maml.nn.mse, 2, 0.05)
    per_task = jax.vmap(lambda t: flat_grad(eqx.filter_grad(lambda m: maml.meta_loss(m, t, inner))(model)))(tasks)
    vmap_of_grad = np.asarray(per_task).mean(axis=0)
    for batching in (maml.Vmap(), maml.Map(), maml.Map(batch_size=2), maml.Unroll()):
        loss, grads = maml.meta_value_and_grad(model, tasks, inner, batching=batching)
        np.testing.assert_allclose(flat_grad(grads), vmap_of_grad, rtol=1e-10, atol=1e-13)
        losses = jax.vmap(lambda t: maml.meta_loss(model, t, inner))(tasks)
        np.testing.assert_allclose(loss, jnp.mean(losses), rtol=1e-12)


def test_jit_equals_no_jit(x64):
    model = tiny_mlp(jax.random.PRNGKey(6))
    tasks = sine_tasks(jax.random.PRNGKey(7))
    inner = maml.InnerLoop(maml.nn.mse, 2, 0.05)
    eager = maml.meta_value_and_grad(model, tasks, inner)
    jitted = eqx.filter_jit(maml.meta_value_and_grad)(model, tasks, inner)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-12)
    np.testing.assert_allclose(flat_grad(eager[1]), flat_grad(jitted[1]), rtol=1e-10, atol=1e-14)


def test_adapt_filter_keeps_other_leaves_fixed_in_the_inner_loop():
    model = tiny_mlp(jax.random.PRNGKey(8))
    head_only = jax.tree.map(lambda _: False, model)
    head_only = eqx.tree_at(lambda m: m.layers[-1], head_only, replace_fn=lambda l: jax.tree.map(lambda _: True, l))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(9)))
    inner = maml.InnerLoop(maml.nn.mse, 3, 0.1, adapt_filter=head_only)
    adapted, losses = inner.adapt(model, task.support_x, task.support_y)
    for before, after in zip(jax.tree.leaves(model.layers[:-1]), jax.tree.leaves(adapted.layers[:-1])):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(model.layers[-1].weight, adapted.layers[-1].weight)
    assert losses.shape == (3,) and losses[-1] < losses[0]
    # the body still gets a meta-gradient (through the adapted head's dependence on it)
    g = eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner))(model)
    assert np.abs(np.asarray(g.layers[0].weight)).sum() > 0


def test_train_step_compiles_once_and_learns():
    traces = {"n": 0}
    optimizer = optax.adam(1e-2)
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    step = maml.make_train_step(optimizer, inner)

    def counting(state, tasks):
        traces["n"] += 1
        return step(state, tasks)

    jitted = eqx.filter_jit(counting)
    state = maml.init_state(maml.nn.MLP(1, 1, (40, 40), key=jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    losses = []
    tasks = sine_tasks(jax.random.PRNGKey(100), num_tasks=8, shots=10, queries=10)
    for i in range(30):
        state, metrics = jitted(state, tasks)
        losses.append(float(metrics["meta_loss"]))
    assert traces["n"] == 1
    assert int(state.step) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_task_shape_errors():
    x, y = jnp.zeros((5, 1)), jnp.zeros((4, 1))
    with pytest.raises(ValueError, match=r"support_x has 5 examples but support_y has 4"):
        maml.Task(x, y, x, x)
    with pytest.raises(ValueError, match=r"query_x has 5 examples but query_y has 4"):
        maml.Task(x, x, x, y)
    uneven = maml.Task(jnp.zeros((2, 5, 1)), jnp.zeros((2, 5, 1)), jnp.zeros((3, 4, 1)), jnp.zeros((3, 4, 1)))
    with pytest.raises(ValueError, match=r"query_x has shape \(3, 4, 1\); expected a leading task axis of 2"):
        maml.meta_value_and_grad(tiny_mlp(jax.random.PRNGKey(0)), uneven, maml.InnerLoop(maml.nn.mse, 1, 0.1))
    batch = maml.Task(jnp.zeros((2, 5, 1)), jnp.zeros((2, 4, 1)), jnp.zeros((2, 3, 1)), jnp.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match=r"support_x has 5 examples but support_y has 4"):
        maml.check_batch(batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1, "lr": 0.1}, r"steps=-1; expected an integer >= 0"),
    ({"steps": 1.5, "lr": 0.1}, r"steps=1.5; expected an integer >= 0"),
    ({"steps": 1, "lr": 0.0}, r"lr=0.0; expected a positive number"),
    ({"steps": 1, "lr": -0.01}, r"lr=-0.01; expected a positive number"),
    ({"steps": 1, "lr": 0.1, "unroll": -1}, r"unroll=-1; expected an integer >= 0"),
])
def test_inner_loop_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        maml.InnerLoop(maml.nn.mse, **kwargs)
