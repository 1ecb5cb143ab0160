"""Conv4 and its fast layers: values, first and second-order derivatives against lax.conv/reduce_window,
central finite differences in float64, max-pool ties, batching values, errors."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml
from benchmarks.conv_forms import Mixed, Shifted
from maml.nn import Im2Col, LaxConv, OneDNN, Winograd, batch_norm, max_pool_2x2

# Correctness tests: the graphs are big and run once, so compile them without backend optimisation.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def ref_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def ref_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def ref_bn(x, s, o, eps=1e-5):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * s + o


class RefConv4(maml.nn.AbstractBatchModel):
    """The same parameters as a `Conv4`, run with plain lax.conv / reduce_window / textbook batch norm."""

    net: maml.nn.Conv4

    def __call__(self, x):
        n = self.net
        for w, s, o in zip(n.conv_weights, n.bn_scales, n.bn_offsets):
            x = ref_pool(jax.nn.relu(ref_bn(ref_conv(x, w), s, o)))
        return x.reshape(x.shape[0], -1) @ n.head_weight + n.head_bias


def tiny_tasks(key, b=2, ways=3, shots=2, queries=2, size=16, channels=1):
    k1, k2 = jax.random.split(key)
    sx = jax.random.normal(k1, (b, ways * shots, size, size, channels))
    qx = jax.random.normal(k2, (b, ways * queries, size, size, channels))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (b, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (b, 1))
    return maml.Task(sx, sy, qx, qy)


# The library's default for the MAML paper's widths (32 and 64 filters), here on a narrow network: the
# float64 checks below run `OneDNN`'s derivative rules on its JAX fallback (tests/test_onednn.py: float32).
WIDE_DEFAULT = maml.nn.default_convs(32)


def tiny_model(key, conv=WIDE_DEFAULT, filters=3, size=16, channels=1, ways=3):
    """A small Conv4 with the convolution form(s) `conv` (by default those of a wide Conv4)."""
    net = maml.nn.Conv4(channels, ways, filters, size, key=key, conv=conv)
    # Non-trivial batch-norm parameters so their gradients are exercised.
    k1, k2 = jax.random.split(jax.random.fold_in(key, 7))
    scales = tuple(1.0 + 0.1 * jax.random.normal(jax.random.fold_in(k1, i), s.shape) for i, s in enumerate(net.bn_scales))
    offsets = tuple(0.1 * jax.random.normal(jax.random.fold_in(k2, i), s.shape) for i, s in enumerate(net.bn_offsets))
    net = eqx.tree_at(lambda m: m.bn_scales, net, scales)
    return eqx.tree_at(lambda m: m.bn_offsets, net, offsets)


def rel_err(a, b):
    a, b = jnp.ravel(a), jnp.ravel(b)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


@pytest.mark.parametrize(
    "conv", [Im2Col(), LaxConv(), Shifted(), Mixed(), Winograd(), OneDNN()], ids=lambda c: type(c).__name__
)
def test_conv_forms_match_lax(x64, conv):
    kx, kw, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 7, 6, 3))
    w = jax.random.normal(kw, (3, 3, 3, 4))
    np.testing.assert_allclose(conv(x, w), ref_conv(x, w), rtol=1e-12, atol=1e-12)
    f = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
    g = lambda x, w: jnp.sum(jnp.sin(ref_conv(x, w)))
    for a, b in zip(_jit(jax.grad(f, (0, 1)))(x, w), _jit(jax.grad(g, (0, 1)))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_winograd_float32_accuracy():
    """In float32 at Conv4's block-2 size, Winograd's extra rounding stays near im2col's (both against the
    float64 convolution)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(10))
    x = jax.random.normal(kx, (4, 14, 14, 64))
    w = jax.random.normal(kw, (3, 3, 64, 64)) / 24.0
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    exact = sum(np.einsum("nhwc,cf->nhwf", xp[:, i : i + 14, j : j + 14], np.asarray(w, np.float64)[i, j])
                for i in range(3) for j in range(3))
    err = {type(c).__name__: rel_err(c(x, w), exact) for c in (Winograd(), Im2Col())}
    assert err["Winograd"] < 1e-6 and err["Winograd"] < 2 * err["Im2Col"], err
    assert err["Im2Col"] > 1e-9, err  # the reference is float64, the forms float32


def test_conv4_default_convolutions():
    wide = OneDNN() if maml.nn.onednn_available() else Winograd()
    assert WIDE_DEFAULT == (Im2Col(), wide, wide, wide)
    assert maml.nn.Conv4(key=jax.random.PRNGKey(0)).convs == WIDE_DEFAULT  # 64 filters
    assert maml.nn.Conv4(3, 5, 32, 84, key=jax.random.PRNGKey(0)).convs == WIDE_DEFAULT
    assert maml.nn.Conv4(3, 5, 31, 84, key=jax.random.PRNGKey(0)).convs == (Im2Col(),) * 4
    assert maml.nn.default_convs(8) == (Im2Col(),) * 4 and maml.nn.default_convs(32) == WIDE_DEFAULT


def test_max_pool_matches_reduce_window(x64):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 9, 3))  # odd sizes: VALID drops the last row/column
    t = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    np.testing.assert_allclose(max_pool_2x2(x), ref_pool(x))
    _, a = jax.jvp(max_pool_2x2, (x,), (t,))
    _, b = jax.jvp(ref_pool, (x,), (t,))
    np.testing.assert_allclose(a, b)
    ct = jax.random.normal(jax.random.PRNGKey(3), ref_pool(x).shape)
    np.testing.assert_allclose(jax.vjp(max_pool_2x2, x)[1](ct)[0], jax.vjp(ref_pool, x)[1](ct)[0])
    # Second order through the pool (grad of a function of the grad) agrees too.
    h = lambda p: lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(p(y) ** 3))(x) * jnp.cos(x))
    np.testing.assert_allclose(jax.grad(h(max_pool_2x2))(x), jax.grad(h(ref_pool))(x), rtol=1e-12)


def test_max_pool_ties():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(-1.0)  # three members tie at the maximum 0
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x)))(x)
    # Tied members share the window's derivative equally (a valid subgradient; nothing lost or doubled).
    np.testing.assert_allclose(g[0, :, :, 0], [[1 / 3, 1 / 3], [1 / 3, 0.0]])
    x = jnp.full((1, 5, 4, 2), 3.0)  # all equal, odd height: one unit per window, the dropped row gets 0
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x)))(x)
    np.testing.assert_allclose(jnp.sum(g), 8.0)
    np.testing.assert_array_equal(g[:, 4], 0.0)
    assert jnp.all(jnp.isfinite(jax.hessian(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)))


def test_batch_norm_matches_textbook(x64):
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 4, 4, 5))
    s, o = jnp.arange(1.0, 6.0), jnp.linspace(-1, 1, 5)
    np.testing.assert_allclose(batch_norm(x, s, o), ref_bn(x, s, o), rtol=1e-12)


@pytest.mark.parametrize("channels", [1, 3, 4])  # 9 and 27 patch columns: folded; 36: not
def test_im2col_normalised_is_batch_norm_of_the_convolution(x64, channels):
    """`Im2Col().normalised` takes batch norm's statistics from the patches' covariance (Conv4's first block):
    its value and derivatives in every argument, to second order, are those of `batch_norm(conv(x, w))`."""
    ks = jax.random.split(jax.random.PRNGKey(6), 6)
    x = jax.random.uniform(ks[0], (3, 7, 6, channels))  # pixel-like, odd sizes (the border's zero padding)
    w = jax.random.normal(ks[1], (3, 3, channels, 5))
    s, o = 1.0 + jax.random.normal(ks[2], (5,)), jax.random.normal(ks[3], (5,))
    ct = jax.random.normal(ks[4], (3, 7, 6, 5))
    folded = lambda *a: jnp.sum(jnp.sin(Im2Col().normalised(*a)) * ct)
    plain = lambda x, w, s, o: jnp.sum(jnp.sin(batch_norm(ref_conv(x, w), s, o)) * ct)
    args = (x, w, s, o)
    np.testing.assert_allclose(Im2Col().normalised(*args), ref_bn(ref_conv(x, w), s, o), rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.grad(folded, range(4))(*args), jax.grad(plain, range(4))(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    v = jax.random.normal(ks[5], w.shape)
    hvp = lambda f: jax.jvp(lambda w: jax.grad(f, (0, 1, 2))(x, w, s, o), (w,), (v,))[1]  # second order
    for a, b in zip(hvp(folded), hvp(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_conv4_shapes_and_errors():
    net = maml.nn.Conv4(key=jax.random.PRNGKey(0))
    assert net(jnp.zeros((4, 28, 28, 1))).shape == (4, 5)
    assert maml.nn.Conv4(3, 5, 32, 84, key=jax.random.PRNGKey(0)).head_weight.shape == (5 * 5 * 32, 5)  # 84->42->21->10->5
    with pytest.raises(ValueError, match="filters=0"):
        maml.nn.Conv4(filters=0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="conv='fft'; expected a maml.nn.AbstractConv3x3"):
        maml.nn.Conv4(conv="fft", key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"x has shape \(4, 28, 28\)"):
        net(jnp.zeros((4, 28, 28)))
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 4, 1\) and w \(3, 3, 2, 2\)"):
        Im2Col()(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 2, 2)))


def test_meta_gradient_matches_reference(x64):
    key = jax.random.PRNGKey(5)
    net = tiny_model(key)
    tasks = tiny_tasks(jax.random.fold_in(key, 1))
    inner = maml.InnerLoop(maml.nn.cross_entropy, 2, 0.4)
    fn = _jit(lambda m: maml.meta_value_and_grad(m, tasks, inner))
    (loss, grads), (ref_loss, ref_grads) = fn(net), fn(RefConv4(net))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads.net)):
        assert rel_err(a, b) < 1e-9


def test_meta_gradient_finite_differences(x64):
    key = jax.random.PRNGKey(6)
    net = tiny_model(key)
    task = jax.tree.map(lambda a: a[0], tiny_tasks(jax.random.fold_in(key, 1), b=1))
    inner = maml.InnerLoop(maml.nn.cross_entropy, 1, 0.4)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    loss = lambda p: maml.meta_loss(eqx.combine(p, static), task, inner)
    f, grads = _jit(loss), _jit(jax.grad(loss))(params)
    direction = jax.tree.map(lambda a, i: jax.random.normal(jax.random.fold_in(key, i), a.shape), params,
                             jax.tree.unflatten(jax.tree.structure(params), range(len(jax.tree.leaves(params)))))
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
    fd = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
    exact = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(float(fd - exact)) / abs(float(exact)) < 1e-6


def test_meta_hvp_forward_over_reverse_matches_reference(x64):
    key = jax.random.PRNGKey(8)
    net = tiny_model(key, conv=(Im2Col(), Winograd(), LaxConv(), Winograd()))
    task = jax.tree.map(lambda a: a[0], tiny_tasks(jax.random.fold_in(key, 1), b=1))
    inner = maml.InnerLoop(maml.nn.cross_entropy, 1, 0.4)

    @_jit
    def hvp(model):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        v = jax.tree.map(jnp.ones_like, params)
        g = jax.grad(lambda p: maml.meta_loss(eqx.combine(p, static), task, inner))
        return jax.jvp(g, (params,), (v,))[1]

    for a, b in zip(jax.tree.leaves(hvp(net)), jax.tree.leaves(hvp(RefConv4(net)).net)):
        assert rel_err(a, b) < 1e-9


def test_batchings_agree():
    key = jax.random.PRNGKey(9)
    net = tiny_model(key)
    tasks = tiny_tasks(jax.random.fold_in(key, 1), b=2)
    inner = maml.InnerLoop(maml.nn.cross_entropy, 1, 0.4)
    fn = _jit(lambda net, tasks, b: maml.meta_value_and_grad(net, tasks, inner, strategy=maml.FirstOrder(),
                                                                batching=b)[1], static_argnums=2)
    outs = [fn(net, tasks, b) for b in (maml.Vmap(), maml.Unroll())]
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
