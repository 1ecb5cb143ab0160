"""Sinusoid MAML: the library against a plain hand-written JAX loop of the same maths, in one run.

`python -m benchmarks.sinusoid_speed [--iterations 70000] [--repeats 3]`. Both train the MAML paper's
setup (MLP 1-40-40-1 ReLU, K=10 support and 10 query points, 1 inner SGD step lr 0.01, meta-batch 25,
Adam 1e-3) for the same number of meta-iterations, 1,000 per compiled `lax.scan` call, alternating
library / plain, after a warm-up (compilation excluded). Prints seconds per run and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import maml
from data.sinusoid import SinusoidTasks, sample_tasks

BATCH, SHOTS, INNER_LR, CHUNK = 25, 10, 0.01, 1000


def library_chunk(optimizer):
    inner = maml.InnerLoop(maml.nn.mse, 1, INNER_LR)
    step = maml.with_task_sampler(maml.make_train_step(optimizer, inner))
    run = eqx.filter_jit(maml.scan_steps(step, CHUNK))
    sampler = SinusoidTasks(BATCH, SHOTS, SHOTS)
    return lambda state: run(state, sampler)


def plain_chunk(optimizer):
    """The same maths by hand: params as a list of (W, b), vmap over tasks, grad of the mean."""

    def forward(params, x):
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w.T + b)
        w, b = params[-1]
        return x @ w.T + b

    def loss(params, x, y):
        return jnp.mean((forward(params, x) - y) ** 2)

    def task_loss(params, sx, sy, qx, qy):
        g = jax.grad(loss)(params, sx, sy)
        adapted = jax.tree.map(lambda p, g: p - INNER_LR * g, params, g)
        return loss(adapted, qx, qy)

    def meta(params, tasks):
        return jnp.mean(jax.vmap(task_loss, (None, 0, 0, 0, 0))(
            params, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y))

    def step(carry, _):
        params, opt_state, key = carry
        key, sub = jax.random.split(key)
        tasks = sample_tasks(sub, BATCH, SHOTS, SHOTS)[0]
        value, grads = jax.value_and_grad(meta)(params, tasks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    return jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=CHUNK))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=70_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.iterations % CHUNK:
        parser.error(f"--iterations {args.iterations}: expected a multiple of {CHUNK}")
    optimizer = optax.adam(1e-3)
    model = maml.nn.MLP(1, 1, (40, 40), key=jax.random.PRNGKey(0))
    lib_state = maml.init_state(model, optimizer, jax.random.PRNGKey(1))
    params = [(layer.weight, layer.bias) for layer in model.layers]
    plain_state = (params, optimizer.init(params), jax.random.PRNGKey(1))
    runners = {"library": (library_chunk(optimizer), lib_state), "plain": (plain_chunk(optimizer), plain_state)}
    for name, (fn, state) in runners.items():  # warm-up: compile
        jax.block_until_ready(fn(state))
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, (fn, state) in runners.items():
            t = time.perf_counter()
            for _ in range(args.iterations // CHUNK):
                state, metrics = fn(state)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
    lib, plain = statistics.median(times["library"]), statistics.median(times["plain"])
    print(f"{args.iterations} meta-iterations, median of {args.repeats}, {jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"library: {lib:.2f} s   plain JAX: {plain:.2f} s   library / plain = {lib / plain:.3f}")


if __name__ == "__main__":
    main()
