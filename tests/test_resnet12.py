"""ResNet12 (MetaOptNet's backbone with batch statistics): shapes for any image size, errors, a textbook
reference forward pass, MetaOptNet's parameter count, the second-order meta-gradient against central
finite differences in float64 (and first order against them, which must differ), per-step batch norm."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml
from maml.nn import Im2Col, LaxConv, ResNet12

# Correctness tests: the graphs are big and run once, so compile them without backend optimisation.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TINY = (2, 3, 4, 5)


def ref_forward(net, x):
    """The same parameters run with lax.conv (3x3 and 1x1), reduce_window and textbook batch norm."""
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn = lambda x, s, o: (x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5) * s + o
    act = lambda x: jnp.where(x > 0, x, 0.1 * x)
    for ws, w1x1, ss, os in zip(net.conv_weights, net.shortcut_weights, net.bn_scales, net.bn_offsets):
        h = act(bn(conv(x, ws[0]), ss[0], os[0]))
        h = act(bn(conv(h, ws[1]), ss[1], os[1]))
        h = bn(conv(h, ws[2]), ss[2], os[2])
        h = act(h + bn(conv(x, w1x1[None, None]), ss[3], os[3]))
        x = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.mean((1, 2)) @ net.head_weight + net.head_bias


def _normal(seed, tree, scale=1.0, base=0.0):
    """`base + scale * N(0, 1)` shaped like `tree`'s arrays, drawn with numpy (no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(base + scale * rng.standard_normal(a.shape), a.dtype), tree)


def tiny_model(seed, ways=2, channels=3, conv=Im2Col()):
    net = ResNet12(channels, ways, TINY, conv=conv, key=jax.random.PRNGKey(seed))
    # Non-trivial batch-norm parameters so their gradients are exercised.
    return eqx.tree_at(lambda m: (m.bn_scales, m.bn_offsets), net,
                       (_normal(seed + 1, net.bn_scales, 0.1, 1.0), _normal(seed + 2, net.bn_offsets, 0.1)))


def test_resnet12_shapes_and_errors():
    net = ResNet12(3, 5, (4, 6, 8, 10), key=jax.random.PRNGKey(0))
    shape = lambda f, *shape: jax.eval_shape(f, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    # Global average pooling: one model for any image size >= 16 (84 -> 42 -> 21 -> 10 -> 5; 32 -> ... -> 2).
    assert shape(net, 4, 84, 84, 3) == (4, 5)
    assert shape(net, 3, 32, 32, 3) == (3, 5)
    assert shape(net.features, 2, 16, 21, 3) == (2, 10)
    assert shape(functools.partial(maml.nn.apply, net), 2, 16, 16, 3) == (2, 5)
    assert net.head_weight.shape == (10, 5) and net.head_bias.shape == (5,)
    assert [w.shape for w in net.conv_weights[1]] == [(3, 3, 4, 6), (3, 3, 6, 6), (3, 3, 6, 6)]
    assert net.shortcut_weights[1].shape == (4, 6) and [s.shape for s in net.bn_offsets[1]] == [(6,)] * 4
    # ANIL's head filter finds the head.
    assert sum(jax.tree.leaves(maml.head_filter(net))) == 2
    for kwargs, match in (
        ({"widths": (4, 6, 8)}, r"widths=\(4, 6, 8\); expected 4 integers >= 1"),
        ({"widths": (4, 6, 0, 8)}, r"widths=\(4, 6, 0, 8\); expected 4 integers >= 1"),
        ({"num_classes": 0}, "num_classes=0; expected an integer >= 1"),
        ({"in_channels": 2.0}, "in_channels=2.0; expected an integer >= 1"),
        ({"conv": "fft"}, "conv='fft'; expected a maml.nn.AbstractConv3x3"),
        ({"conv": (Im2Col(),) * 3}, r"conv=\(Im2Col\(\), Im2Col\(\), Im2Col\(\)\); expected .* or 4 of them"),
    ):
        with pytest.raises(ValueError, match=f"^ResNet12: {match}") as e:
            ResNet12(key=jax.random.PRNGKey(0), **kwargs)
        assert "\n" not in str(e.value)
    for bad in ((4, 32, 32), (4, 32, 32, 1), (4, 8, 32, 3)):
        with pytest.raises(ValueError, match=r"^ResNet12: x has shape \(4, \d+, 32(, \d)?\); expected \[N, H, W, 3\] "
                                             r"\(NHWC\) with H, W >= 16$"):
            net(jnp.zeros(bad))


def test_resnet12_matches_reference(x64):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 21, 18, 3)))  # odd sizes: VALID pooling drops a row
    net = tiny_model(1, ways=4)
    mixed = eqx.tree_at(lambda m: m.convs, net, (Im2Col(), LaxConv(), Im2Col(), LaxConv()))
    got, via_lax, want = _jit(lambda n, m, x: (n(x), m(x), ref_forward(n, x)))(net, mixed, x)
    assert float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(via_lax, want, rtol=1e-10, atol=1e-12)


def test_resnet12_parameter_count():
    """The default model has MetaOptNet's ResNet-12 embedding's parameters (about 12.4M) plus the head."""
    net = ResNet12(3, 5, key=jax.random.PRNGKey(2))
    count = sum(a.size for a in jax.tree.leaves(eqx.filter(net, eqx.is_inexact_array)))
    # The same count without materialising: the defaults are in_channels=3, num_classes=5.
    shapes = jax.eval_shape(lambda k: ResNet12(key=k), jax.random.PRNGKey(0))
    assert count == sum(a.size for a in jax.tree.leaves(shapes))
    expected, cin = 0, 3
    for c in (64, 160, 320, 640):
        expected += 9 * cin * c + 2 * 9 * c * c  # conv1 (cin -> c), conv2 and conv3 (c -> c), no bias
        expected += cin * c  # the 1x1 shortcut convolution, no bias
        expected += 4 * 2 * c  # bn1, bn2, bn3 and the shortcut's bn: weight and bias each
        cin = c
    assert expected == 12_424_320  # 76,160 + 564,480 + 2,357,760 + 9,425,920
    assert count == expected + 640 * 5 + 5


def tiny_task(seed, ways=2, shots=1, queries=3, size=16, channels=3):
    rng = np.random.default_rng(seed)
    image = lambda n: jnp.asarray(rng.standard_normal((n, size, size, channels)))
    return maml.Task(image(ways * shots), jnp.repeat(jnp.arange(ways), shots),
                     image(ways * queries), jnp.repeat(jnp.arange(ways), queries))


def test_meta_gradient_finite_differences(x64):
    """Second-order MAML through two inner SGD steps on a 2-way 1-shot task: the meta-gradient's directional
    derivative along a random direction against a central difference; first order must NOT match.

    The meta-objective is only piecewise smooth: the inner gradient jumps where a leaky ReLU or a max-pool
    switches, so the adapted parameters, and the query loss, jump there. A central difference straddling
    such a switch is off by jump / (2 eps); eps = 1e-7 (float64 round-off ~1e-9 relative) makes that rare.
    """
    net, task = tiny_model(3), tiny_task(4)
    inner = maml.InnerLoop(maml.nn.cross_entropy, 2, 0.1)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    direction = _normal(5, params)
    eps = 1e-7

    @_jit
    def run(params, direction, task):
        loss = lambda s, p: maml.meta_loss(eqx.combine(p, static), task, inner, strategy=s)
        shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
        fd = (loss(maml.SecondOrder(), shift(eps)) - loss(maml.SecondOrder(), shift(-eps))) / (2 * eps)
        dot = lambda g: sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
        second = dot(jax.grad(functools.partial(loss, maml.SecondOrder()))(params))
        first = dot(jax.grad(functools.partial(loss, maml.FirstOrder()))(params))
        return fd, second, first

    fd, second, first = (float(v) for v in run(params, direction, task))
    assert abs(second - fd) / abs(fd) < 1e-6, (second, fd)
    # Sensitivity: first-order MAML drops the Hessian terms, which are far above the check's tolerance here.
    assert abs(first - fd) / abs(fd) > 1e-2, (first, fd)


def test_per_step_resnet12():
    """`maml.nn.PerStep` (MAML++ per-step batch norm, shortcuts' included): step k's view is a ResNet12 with
    row k; one inner step's first-order meta-gradient uses row 0 only."""
    plain = tiny_model(6)
    net = maml.nn.PerStep(plain, 2)
    assert net.model.bn_scales[3][3].shape == (2, 5) and net.model.conv_weights[3][2].shape == (3, 3, 5, 5)
    rows = lambda m: (m.model.bn_scales, m.model.bn_offsets)
    net = eqx.tree_at(rows, net, jax.tree.map(jnp.add, rows(net), _normal(7, rows(net), 0.2)))  # distinct rows
    task = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype.kind == "f" else a, tiny_task(8))
    inner = maml.InnerLoop(maml.nn.cross_entropy, 1, 0.4)

    @_jit
    def run(net, plain, task):
        with_row = lambda k: eqx.tree_at(lambda m: (m.bn_scales, m.bn_offsets), plain,
                                         jax.tree.map(lambda a: a[k], rows(net)))
        views = [(maml.network(net, jnp.int32(k))(task.query_x), with_row(k)(task.query_x)) for k in (0, 1)]
        grads = eqx.filter_grad(lambda m: maml.meta_loss(m, task, inner, strategy=maml.FirstOrder()))(net)
        return views, grads

    views, grads = run(net, plain, task)
    for got, want in views:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[0][0], views[1][0], rtol=1e-3)
    for g in jax.tree.leaves(rows(grads)):
        assert float(jnp.abs(g[0]).max()) > 0 and float(jnp.abs(g[1]).max()) == 0.0
