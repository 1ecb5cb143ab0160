"""Every example of the seed notebook (../shared/seed/), through maml's public API, with its printed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml


def test_hessian_of_dot_is_2I():
    f = lambda x: jnp.dot(x, x)
    np.testing.assert_array_equal(maml.hessian(f)(jnp.array([1.0, 2.0, 3.0])), 2 * np.eye(3))


def test_meta_gradient_through_one_sgd_step_matches_notebook_formula(x64):
    # The notebook's meta_loss_fn: loss after one SGD step, differentiated with jax.grad.
    lr = 0.1
    loss_fn = lambda params, x, y: jnp.mean((x @ params - y) ** 2)
    params = jnp.array([0.3, -0.2])
    x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.1]])
    y = jnp.array([1.0, -0.5, 0.7])

    def meta_loss_fn(params, data):
        grads = jax.grad(loss_fn)(params, *data)
        return loss_fn(params - lr * grads, *data)

    expected = jax.grad(meta_loss_fn)(params, (x, y))
    inner = maml.InnerLoop(loss_fn, steps=1, lr=lr)
    task = maml.Task(x, y, x, y)
    got = jax.grad(maml.meta_loss)(params, task, inner)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # second order really differs from first order here (the Hessian term matters)
    fo = jax.grad(maml.meta_loss)(params, task, inner, strategy=maml.FirstOrder())
    assert np.max(np.abs(fo - expected)) > 1e-3


def test_td0_update_and_cross_check():
    value_fn = lambda theta, state: jnp.dot(theta, state)
    theta = jnp.array([0.1, -0.1, 0.0])
    s_tm1, r_t, s_t = jnp.array([1.0, 2.0, -1.0]), jnp.array(1.0), jnp.array([2.0, 1.0, 0.0])
    delta = jax.grad(maml.td0_loss, argnums=1)(value_fn, theta, s_tm1, r_t, s_t)
    np.testing.assert_allclose(delta, [1.2, 2.4, -1.2], rtol=1e-6)
    cross = (r_t + value_fn(theta, s_t) - value_fn(theta, s_tm1)) * jax.grad(value_fn)(theta, s_tm1)
    np.testing.assert_allclose(delta, cross, rtol=1e-6)
    # without stop_gradient it would be a different (true-gradient) update
    full = jax.grad(lambda th: -0.5 * (r_t + value_fn(th, s_t) - value_fn(th, s_tm1)) ** 2)(theta)
    assert not np.allclose(full, delta)


def test_straight_through_round():
    st = maml.straight_through(jnp.round)
    assert float(jnp.round(3.2)) == 3.0
    assert float(st(3.2)) == 3.0
    assert float(jax.grad(jnp.round)(3.2)) == 0.0
    assert float(jax.grad(st)(3.2)) == 1.0


def test_hvp_both_forms_equal_dense_hessian_times_v(x64):
    f = lambda p: jnp.sum(jnp.sin(p["a"]) * p["b"] ** 2) + jnp.prod(p["a"])
    x = {"a": jnp.array([0.3, -1.2, 0.8]), "b": jnp.array([1.5, 0.4, -0.7])}
    v = {"a": jnp.array([1.0, 0.5, -2.0]), "b": jnp.array([0.2, -1.0, 0.3])}
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    H = jax.hessian(lambda z: f(unravel(z)))(flat)
    expected = H @ jax.flatten_util.ravel_pytree(v)[0]
    for fn in (maml.hvp, maml.hvp_reverse):
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(fn(f, x, v))[0], expected, rtol=1e-12)


# The notebook's inputs and the parameters behind its printed Jacobians. jax's PRNG no longer draws the
# notebook's W, b from random.key(0), so they are recovered (to the printed digits) from its printed
# b-Jacobian s'(z) and Hessian diagonal s''(z) x_0^2 by solving inputs @ W + b = z.
INPUTS = np.array([[0.52, 1.12, 0.77], [0.88, -1.08, 0.15], [0.52, 0.06, -1.30], [0.74, -2.49, 1.39]])
W = np.array([-1.53630648, 0.96595935, 0.54543824])
B = np.array(0.15466494)
J_PRINTED = np.array([[0.10874642, 0.23422305, 0.16102834], [0.08166757, -0.10022839, 0.01392061],
                      [0.08774893, 0.01012488, -0.21937233], [0.04643593, -0.15625063, 0.08722425]])
JB_PRINTED = np.array([0.20912772, 0.09280407, 0.16874795, 0.06275126])
H_PRINTED = np.array([
    [[-0.02286455, -0.04924672, -0.03385712], [-0.04924672, -0.10606987, -0.07292303], [-0.03385712, -0.07292303, -0.05013458]],
    [[0.05698795, -0.06993975, 0.00971385], [-0.06993975, 0.08583514, -0.01192155], [0.00971385, -0.01192155, 0.00165577]],
    [[0.02601311, 0.00300151, -0.06503277], [0.00300151, 0.00034633, -0.00750378], [-0.06503277, -0.00750378, 0.16258194]],
    [[0.02973893, -0.10006747, 0.05586096], [-0.10006747, 0.33671352, -0.18796457], [0.05586096, -0.18796457, 0.10492801]],
])


def sigmoid(x):
    return 0.5 * (jnp.tanh(x / 2.0) + 1)


def predict(W, b, inputs):
    return sigmoid(jnp.dot(inputs, W) + b)


def test_jacfwd_equals_jacrev_and_printed_values():
    f = lambda w: predict(w, jnp.asarray(B), jnp.asarray(INPUTS))
    jf, jr = maml.jacfwd(f)(jnp.asarray(W)), maml.jacrev(f)(jnp.asarray(W))
    assert jf.shape == (4, 3)
    np.testing.assert_allclose(jf, jr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jf, J_PRINTED, atol=2e-6)


def test_jacrev_over_dict_parameters():
    predict_dict = lambda params, inputs: predict(params["W"], params["b"], inputs)
    params = {"W": jnp.asarray(W), "b": jnp.asarray(B)}
    jr = maml.jacrev(predict_dict)(params, jnp.asarray(INPUTS))
    jf = maml.jacfwd(predict_dict)(params, jnp.asarray(INPUTS))
    for k in ("W", "b"):
        np.testing.assert_allclose(jr[k], jf[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jr["W"], J_PRINTED, atol=2e-6)
    np.testing.assert_allclose(jr["b"], JB_PRINTED, atol=2e-6)


def test_hessian_of_sigmoid_predictor(x64):
    W64, inputs = jnp.asarray(W), jnp.asarray(INPUTS)
    f = lambda W: predict(W, jnp.asarray(B), inputs)
    H = maml.hessian(f)(W64)
    assert H.shape == (4, 3, 3)
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), rtol=1e-12)
    # closed form: s''(z_i) x_i x_i^T with s'' = s (1 - s) (1 - 2 s)
    s = f(W64)
    closed = (s * (1 - s) * (1 - 2 * s))[:, None, None] * inputs[:, :, None] * inputs[:, None, :]
    np.testing.assert_allclose(H, closed, rtol=1e-10)
    np.testing.assert_allclose(H, H_PRINTED, atol=2e-6)
    # forward-over-reverse equals reverse-over-forward
    np.testing.assert_allclose(H, jax.jacrev(jax.jacfwd(f))(W64), rtol=1e-10)


@pytest.mark.parametrize("bad", [jnp.array([1.0, 2.0])])
def test_hvp_rejects_nothing_silently(bad):
    # v must have x's structure: a mismatch is an error, not a broadcast
    f = lambda x: jnp.sum(x**3)
    with pytest.raises((TypeError, ValueError)):
        maml.hvp(f, jnp.array([1.0, 2.0, 3.0]), bad)
