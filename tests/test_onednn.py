"""`maml.nn.OneDNN`: oneDNN's float32 convolution through XLA's FFI against `lax.conv` (value, derivatives to
third order, under vmap and lax.map), its derivative rules in float64 on the JAX fallback, the fallback
without the extension, bad input.

Where the extension is not built the float32 tests skip with the reason; `.ci/run` sets
MAML_REQUIRE_ONEDNN=1 and installs oneDNN, so there a missing extension fails instead."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml
from maml.nn import Im2Col, LaxConv, OneDNN, Winograd, onednn

needs_extension = pytest.mark.skipif(
    not onednn.available() and os.environ.get("MAML_REQUIRE_ONEDNN") != "1",
    reason="maml.nn._onednn is not built (install libdnnl-dev, then pip install -e . again)",
)


def test_extension_present_where_required():
    if os.environ.get("MAML_REQUIRE_ONEDNN") == "1":
        assert onednn.available(), "MAML_REQUIRE_ONEDNN=1 but maml.nn._onednn did not import"


def _f(conv):
    """A loss that is nonlinear in the convolution and uses it twice (so second derivatives mix)."""
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w)) ** 2 * conv(x, 0.5 * w))


def _cases(x, w, v):
    """Name -> function of a convolution form: every derivative path MAML and the curvature tools use."""
    xs, ws = jnp.stack([x, x + 1.0]), jnp.stack([w, 2.0 * w])
    return {
        "value": lambda c: _f(c)(x, w),
        "grad": lambda c: jax.grad(_f(c), (0, 1))(x, w),
        "forward-over-reverse": lambda c: jax.jvp(lambda w: jax.grad(_f(c), 1)(x, w), (w,), (v,))[1],
        "reverse-over-reverse": lambda c: jax.grad(lambda w: jnp.sum(jax.grad(_f(c), (0, 1))(x, w)[0] ** 2))(w),
        "third order": lambda c: jax.grad(
            lambda x: jnp.sum(jax.jvp(lambda w: jax.grad(_f(c), 1)(x, w), (w,), (v,))[1] ** 2)
        )(x),
        "vmap of grad, shared weights": lambda c: jax.vmap(jax.grad(_f(c), 1), (0, None))(xs, w),
        "grad of vmap, batched weights": lambda c: jax.grad(
            lambda w: jnp.sum(jax.vmap(_f(c), (None, 0))(x, jnp.stack([w, 2.0 * w])))
        )(w),
        "vmap on axis 1": lambda c: jax.vmap(jax.grad(_f(c), (0, 1)), (1, 3))(jnp.moveaxis(xs, 0, 1), jnp.moveaxis(ws, 0, 3)),
        "lax.map of grad": lambda c: jax.lax.map(lambda a: jax.grad(_f(c), 1)(*a), (xs, ws)),
    }


def _data(dtype):
    r = np.random.RandomState(0)
    x, w, v = r.randn(3, 6, 5, 4), r.randn(3, 3, 4, 2), r.randn(3, 3, 4, 2)
    return (jnp.asarray(a, dtype) for a in (x, w, v))


def _max_rel_err(a, b):
    return max(
        float(jnp.max(jnp.abs(p - q)) / jnp.maximum(jnp.max(jnp.abs(q)), 1e-30))
        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("case", list(_cases(*_data(np.float32))))
@needs_extension
def test_float32_onednn_matches_lax(case):
    x, w, v = _data(np.float32)
    fn = _cases(x, w, v)[case]
    assert "maml_onednn_" in jax.jit(lambda: fn(OneDNN())).lower().as_text()  # oneDNN runs, not the fallback
    err = _max_rel_err(jax.jit(lambda: fn(OneDNN()))(), jax.jit(lambda: fn(LaxConv()))())
    assert err < 2e-5, err


@pytest.mark.parametrize("case", list(_cases(*_data(np.float32))))
def test_float64_rules_match_lax(x64, case):
    """The same derivative rules, lowered to the JAX fallback (float64 never goes to oneDNN)."""
    x, w, v = _data(np.float64)
    fn = _cases(x, w, v)[case]
    assert "maml_onednn_" not in jax.jit(lambda: fn(OneDNN())).lower().as_text()
    assert _max_rel_err(jax.jit(lambda: fn(OneDNN()))(), fn(LaxConv())) < 1e-12


@pytest.mark.parametrize("fallback", [Winograd(), Im2Col(), LaxConv()], ids=lambda c: type(c).__name__)
def test_without_extension_lowers_to_fallback(monkeypatch, fallback):
    monkeypatch.setattr(onednn, "_onednn", None)
    x, w, v = _data(np.float32)
    fn = _cases(x, w, v)["forward-over-reverse"]
    assert "maml_onednn_" not in jax.jit(lambda: fn(OneDNN(fallback))).lower().as_text()
    assert _max_rel_err(jax.jit(lambda: fn(OneDNN(fallback)))(), fn(LaxConv())) < 2e-5


@needs_extension
def test_float32_block_shapes():
    """Conv4's block shapes: 1 and 64 input channels, odd sizes, fewer output channels; odd numbers of images
    and one image, which a call splits unevenly or not at all over its threads."""
    r = np.random.RandomState(1)
    for n, h, c, f in [(5, 28, 1, 64), (3, 7, 64, 64), (2, 3, 64, 32), (1, 7, 64, 64)]:  # odd and 1: split
        x = jnp.asarray(r.randn(n, h, h, c), jnp.float32)
        w = jnp.asarray(r.randn(3, 3, c, f) / np.sqrt(9 * c), jnp.float32)
        g = jnp.asarray(r.randn(n, h, h, f), jnp.float32)
        y, vjp = jax.vjp(jax.jit(OneDNN()), x, w)
        y_ref, vjp_ref = jax.vjp(LaxConv(), x, w)
        assert y.shape == (n, h, h, f)
        assert _max_rel_err((y, *vjp(g)), (y_ref, *vjp_ref(g))) < 2e-5


def _has_avx512() -> bool:
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@needs_extension
def test_algorithm_by_shape():
    """oneDNN's Winograd where it was measured faster (AVX-512 hosts: 16-channel multiples, images from 7x7 and
    256 output pixels per item; weight gradients from 32 output channels per item), the direct convolution else."""
    from maml.nn import _onednn

    winograd = "winograd" if _has_avx512() else "direct"
    # (n, h, w, c, f, fc): Conv4's block 2 and 3 query items, mini-ImageNet's block 2 (16-channel items).
    assert _onednn.algorithms(38, 14, 14, 64, 64, 32) == (winograd, winograd)
    assert _onednn.algorithms(37, 7, 7, 64, 64, 32) == (winograd, winograd)
    assert _onednn.algorithms(38, 42, 42, 32, 32, 16) == (winograd, "direct")
    for small in [(3, 7, 7, 64, 64, 32), (37, 5, 5, 64, 64, 32), (37, 3, 3, 64, 64, 32), (8, 14, 14, 48, 40, 40),
                  (37, 28, 28, 1, 64, 32)]:
        assert _onednn.algorithms(*small) == ("direct", "direct"), small


@needs_extension
def test_float32_winograd_shapes():
    """Value and both gradients where oneDNN's Winograd runs (Conv4's block 2 at 75 images, block 3, 48
    channels, mini-ImageNet's 32-channel block 3, and a non-square image) against `lax.conv`."""
    r = np.random.RandomState(3)
    for n, h, w, c, f in [(75, 14, 14, 64, 64), (75, 7, 7, 64, 64), (6, 12, 9, 48, 48), (4, 21, 21, 32, 32)]:
        x = jnp.asarray(np.maximum(r.randn(n, h, w, c), 0), jnp.float32)  # post-ReLU, as in Conv4
        k = jnp.asarray(r.randn(3, 3, c, f) / np.sqrt(9 * c), jnp.float32)
        g = jnp.asarray(r.randn(n, h, w, f), jnp.float32)
        y, vjp = jax.vjp(jax.jit(OneDNN()), x, k)
        y_ref, vjp_ref = jax.vjp(LaxConv(), x, k)
        assert _max_rel_err((y, *vjp(g)), (y_ref, *vjp_ref(g))) < 2e-5, (n, h, w, c, f)


@needs_extension
def test_buffers_are_freed_and_counted():
    """Each piece of work frees its blocked copies and scratchpads when it ends; their high-water mark is counted
    (Winograd's pieces at block 2's shapes hold several MB) and starts again from zero after a reset."""
    x, w = jnp.ones((8, 14, 14, 64)), jnp.ones((3, 3, 64, 64)) / 576
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(OneDNN()(x, w) ** 2), argnums=(0, 1)))
    jax.block_until_ready(f(x, w))
    onednn.buffer_bytes(reset=True)
    assert onednn.buffer_bytes() == (0, 0)
    jax.block_until_ready(f(x, w))
    now, peak = onednn.buffer_bytes()
    assert now == 0 and peak > 2**20, (now, peak)


@needs_extension
def test_float32_concurrent_calls():
    """Independent convolutions and weight gradients of one shape in one program, which XLA runs on several
    threads at once: each call must bring its own scratchpad (oneDNN's shared one gave errors of order 1)."""
    r = np.random.RandomState(2)
    k, n, h, c = 6, 8, 14, 64
    xs = jnp.asarray(r.randn(k, n, h, h, c), jnp.float32)
    ws = jnp.asarray(r.randn(k, 3, 3, c, c) / 24, jnp.float32)
    gs = jnp.asarray(r.randn(k, n, h, h, c), jnp.float32)

    def many(conv):
        def one(x, w, g):
            y, vjp = jax.vjp(conv, x, w)
            return (y, *vjp(g))

        return jax.jit(lambda xs, ws, gs: [one(xs[i], ws[i], gs[i]) for i in range(k)])

    ref, run = many(LaxConv())(xs, ws, gs), many(OneDNN())
    for _ in range(5):
        assert _max_rel_err(run(xs, ws, gs), ref) < 2e-5


_THREADS = """
import collections, ctypes, os, threading
import jax, jax.numpy as jnp
from maml.nn import LaxConv, OneDNN

def count():  # threads named like the main one: OpenMP's workers (XLA names its pools)
    main = open(f"/proc/self/task/{os.getpid()}/comm").read()
    return sum(open(f"/proc/self/task/{t}/comm").read() == main for t in os.listdir("/proc/self/task"))

x, w = jnp.ones((75, 14, 14, 64)), jnp.ones((3, 3, 64, 64))
step = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
run = lambda f: [jax.block_until_ready(f(x, w)) for _ in range(3)]
run(step(LaxConv()))
before = count()
gomp = ctypes.CDLL("libgomp.so.1")
gomp.omp_set_num_threads(3)
f = step(OneDNN())
ts = [threading.Thread(target=run, args=(f,)) for _ in range(3)]
[t.start() for t in ts], [t.join() for t in ts], run(f)
print(before, count(), gomp.omp_get_max_threads())
"""


@needs_extension
def test_float32_calls_start_no_openmp_threads():
    """oneDNN runs single-threaded inside each call, which splits its work over XLA's own pool: an OpenMP team
    started from XLA's threads made libgomp stop spinning for every team in the process, PyTorch's too
    (1.3-1.7x slower). Calls from several threads start no thread, and leave the caller's OpenMP setting."""
    out = subprocess.run([sys.executable, "-c", _THREADS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, omp = map(int, out.stdout.split())
    assert after == before, f"{after - before} OpenMP threads started by oneDNN calls"
    assert omp == 3


@needs_extension
def test_float32_conv4_meta_gradient_matches_lax():
    """Second-order MAML through a Conv4 whose blocks 2-4 run oneDNN, against the same network on `lax.conv`."""
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    tasks = maml.Task(
        jax.random.normal(k1, (2, 6, 16, 16, 1)), jnp.tile(jnp.arange(3).repeat(2), (2, 1)),
        jax.random.normal(k2, (2, 6, 16, 16, 1)), jnp.tile(jnp.arange(3).repeat(2), (2, 1)),
    )
    inner = maml.InnerLoop(maml.nn.cross_entropy, 2, 0.4)

    def grads(conv):
        net = maml.nn.Conv4(1, 3, 8, 16, conv=conv, key=key)
        return jax.jit(lambda m: maml.meta_value_and_grad(m, tasks, inner, batching=maml.Map()))(net)

    (loss, g), (loss_ref, g_ref) = grads((Im2Col(), OneDNN(), OneDNN(), OneDNN())), grads(LaxConv())
    assert abs(float(loss) - float(loss_ref)) < 1e-5 * abs(float(loss_ref))
    got = [a for a in jax.tree.leaves(g) if hasattr(a, "shape")]
    want = [a for a in jax.tree.leaves(g_ref) if hasattr(a, "shape")]
    assert _max_rel_err(got, want) < 1e-4


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 5\).*expected x \[N, H, W, C\]"):
        OneDNN()(jnp.ones((2, 5, 5)), jnp.ones((3, 3, 5, 4)))
    with pytest.raises(ValueError, match=r"w \(3, 3, 4, 2\).*w \[3, 3, C, F\]"):
        OneDNN()(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="x is float32 and w int32; expected one dtype"):
        OneDNN()(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 2), jnp.int32))
