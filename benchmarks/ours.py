"""Our side of the benchmark: the library's public API (`maml.make_train_step` with a batching value).

Parameters are exchanged with the peers as numpy arrays under torch's names and layouts
(conv weights OIHW, linear weights `[out, in]`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml

from .workloads import Workload


def default_batching(w: Workload) -> maml.AbstractBatching:
    """The library's default for the workload on this backend: `Vmap` for the MLP; for Conv4
    `maml.convolution_batching` (`Map` on CPU, `Vmap` on accelerators)."""
    if w.model == "mlp":
        return maml.Vmap()
    return maml.convolution_batching(jax.default_backend())


def build_model(w: Workload, key=None, conv=None):
    """The workload's model: Conv4 with the convolution form(s) `conv` (None: the library's default,
    `maml.nn.default_convs`: `Im2Col` for the first block and `OneDNN` after at these widths, `Winograd` where
    the extension is not built), or the sinusoid MLP."""
    key = jax.random.PRNGKey(0) if key is None else key
    if w.model == "conv4":
        return maml.nn.Conv4(w.channels, w.ways, w.filters, w.image_size, conv=conv, key=key)
    return maml.nn.MLP(1, 1, (40, 40), key=key)


def torch_params(model, w: Workload) -> dict[str, np.ndarray]:
    """`model`'s arrays under torch's names and layouts (float64 copies)."""
    f = lambda a: np.asarray(a, dtype=np.float64)
    if w.model == "mlp":
        out = {}
        for i, layer in enumerate(model.layers):
            out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = f(layer.weight), f(layer.bias)
        return out
    out = {}
    for i in range(4):
        out[f"convs.{i}.weight"] = f(model.conv_weights[i]).transpose(3, 2, 0, 1)
        out[f"bns.{i}.weight"], out[f"bns.{i}.bias"] = f(model.bn_scales[i]), f(model.bn_offsets[i])
    # Our head sees NHWC-flattened features [s, s, F]; torch flattens NCHW [F, s, s]: permute its rows.
    head = f(model.head_weight)
    s = int(round((head.shape[0] // w.filters) ** 0.5))
    head = head.reshape(s, s, w.filters, -1).transpose(2, 0, 1, 3).reshape(head.shape[0], -1)
    out["head.weight"], out["head.bias"] = head.T, f(model.head_bias)
    return out


def task_batch(w: Workload, batch: dict[str, np.ndarray], dtype=jnp.float32) -> maml.Task:
    conv = lambda k, v: jnp.asarray(v, dtype if k.endswith("_x") or w.model == "mlp" else jnp.int32)
    return maml.Task(**{k: conv(k, v) for k, v in batch.items()})


def inner_loop(w: Workload) -> maml.InnerLoop:
    loss = maml.nn.cross_entropy if w.model == "conv4" else maml.nn.mse
    return maml.InnerLoop(loss, w.steps, w.inner_lr)


def strategy(w: Workload) -> maml.AbstractStrategy:
    return maml.SecondOrder() if w.second_order else maml.FirstOrder()


class Ours:
    """Jitted `make_train_step` on a fixed device-resident batch: one meta-iteration per call, or for
    the sinusoid `steps_per_call` iterations in one `lax.scan` (as `maml.scan_steps` runs training)."""

    def __init__(self, w: Workload, model, batch, batching=None, dtype=jnp.float32, steps_per_call=None):
        self.w = w
        self.batching = default_batching(w) if batching is None else batching
        model = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)
        self.tasks = task_batch(w, batch, dtype)
        optimizer = optax.adam(w.outer_lr)
        self.state = maml.init_state(model, optimizer, jax.random.PRNGKey(0))
        step = maml.make_train_step(optimizer, inner_loop(w), strategy=strategy(w), batching=self.batching)
        self.steps_per_call = (100 if w.model == "mlp" else 1) if steps_per_call is None else steps_per_call
        if self.steps_per_call > 1:
            one = step
            step = lambda s, t: jax.lax.scan(lambda c, _: one(c, t), s, None, length=self.steps_per_call)
        self._step = jax.jit(step, donate_argnums=0)
        self._compiled = None

    def compiled(self):
        """The compiled step (for XLA's cost and memory analysis)."""
        if self._compiled is None:
            self._compiled = self._step.lower(self.state, self.tasks).compile()
        return self._compiled

    def step(self):
        self.state, metrics = self.compiled()(self.state, self.tasks)
        return metrics

    def sync(self):
        jax.block_until_ready(self.state)

    def meta_grad(self) -> dict[str, np.ndarray]:
        """The mean meta-gradient under torch's names and layouts."""
        fn = jax.jit(lambda m, t: maml.meta_value_and_grad(
            m, t, inner_loop(self.w), strategy=strategy(self.w), batching=self.batching)[1])
        grads = fn(self.state.model, self.tasks)
        return torch_params(eqx.combine(grads, eqx.filter(self.state.model, eqx.is_inexact_array, inverse=True)), self.w)

    def flops(self) -> float:
        ca = self.compiled().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops", 0.0))
        if isinstance(self.batching, maml.Map):  # XLA counts a while loop's body once
            flops *= self.w.meta_batch / (self.batching.batch_size or 1)
        return flops  # per call (XLA counts a scan body once too; see steps_per_call)

    def peak_bytes(self) -> int:
        m = self.compiled().memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)
