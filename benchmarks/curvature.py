"""Cost of curvature diagnostics: one HVP as a multiple of one gradient, and Lanczos steps to 1e-3.

    python -m benchmarks.curvature [--repeats 7] [--batch 25] [--lanczos-steps 80] [--mlp-loop 1000] [--skip-conv4]

1. For the sinusoid MLP (1-40-40-1 ReLU, 10 points) and Conv4 (64 filters, 28x28x1, 5 classes, a batch
   of `--batch` images): jitted `grad` vs jitted HVP by forward-over-reverse and reverse-over-reverse,
   median of `--repeats` interleaved timings after a warm-up (compilation excluded). Theory: 2-4x.
   The MLP is too small to time one call (dispatch dominates): it is timed per evaluation inside a
   compiled loop of `--mlp-loop` dependent evaluations. Also the MLP's meta-loss (1 inner step).
2. For the Conv4 cross-entropy loss: one run of `--lanczos-steps` Lanczos steps (full reorthogonalisation);
   since Lanczos is nested, the j-step top Ritz value is the top eigenvalue of T's leading j x j block.
   Reports the first j within 1e-3 relative of the final value, and the first j whose Ritz residual
   bound certifies 1e-3 (|beta_j s_j| / theta <= 1e-3), with no reference needed.
Float32, random inputs with fixed seeds (the timings do not depend on the data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import maml
from maml import curvature as C
from maml.curvature import lanczos


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def _looped(fn, loop: int):
    """`loop` dependent evaluations of `fn(a, v, data)` in one compiled call (no dispatch overhead;
    the arguments change every iteration, so nothing is hoisted out of the loop). Data are arguments,
    not constants, so XLA cannot constant-fold the data-only part of the model."""
    if loop == 1:
        return jax.jit(fn)

    def body(_, carry, data):
        a, v = carry
        out = fn(a, v, data)
        nudge = lambda x, y: x + 1e-9 * y
        return jax.tree.map(nudge, a, out), jax.tree.map(nudge, v, out)

    return jax.jit(lambda a, v, data: jax.lax.fori_loop(0, loop, lambda i, c: body(i, c, data), (a, v)))


def hvp_vs_grad(f, params, data, repeats: int, loop: int = 1) -> dict:
    """Median seconds of one grad / one HVP (both modes) of scalar `f(params, data)` w.r.t. params,
    jitted, interleaved; with `loop > 1`, per evaluation inside a compiled loop of `loop` (for models
    too small to time one call)."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    fa = lambda a, d: f(eqx.combine(a, static), d)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), arrays)
    fns = {
        "grad": _looped(lambda a, v, d: jax.grad(fa)(a, d), loop),
        "forward_over_reverse": _looped(lambda a, v, d: C.hvp(lambda b: fa(b, d), a, v), loop),
        "reverse_over_reverse": _looped(lambda a, v, d: C.hvp(lambda b: fa(b, d), a, v, mode=C.ReverseOverReverse()), loop),
    }
    args = {name: (arrays, v, data) for name in fns}
    for name, fn in fns.items():  # compile + warm up
        _timed(fn, *args[name])
        _timed(fn, *args[name])
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, *args[name]))
    med = {name: statistics.median(t) / loop for name, t in times.items()}
    out = {f"{name}_ms": 1e3 * t for name, t in med.items()}
    out["fwd_rev_over_grad"] = med["forward_over_reverse"] / med["grad"]
    out["rev_rev_over_grad"] = med["reverse_over_reverse"] / med["grad"]
    out["num_params"] = int(ravel_pytree(arrays)[0].size)
    out["evaluations_per_call"] = loop
    return out


def lanczos_convergence(f, params, data, steps: int, tol: float = 1e-3) -> dict:
    """HVPs Lanczos needs for the top eigenvalue of the Hessian of `f(params, data)` to `tol` relative."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    x, unravel = ravel_pytree(arrays)

    @jax.jit
    def run(x, data, v0, key):
        fa = lambda u: f(eqx.combine(unravel(u), static), data)
        s = lanczos(lambda u: C.hvp(fa, x, u), v0, steps, key=key)
        return s.alpha, s.alpha_lo, s.beta, s.beta_lo

    v0 = jax.random.rademacher(jax.random.key(0), x.shape, x.dtype)
    t = time.perf_counter()
    a, alo, b, blo = (np.asarray(u, np.float64) for u in run(x, data, v0, jax.random.key(1)))
    seconds = time.perf_counter() - t
    a, b = a + alo, b + blo
    tops, certs = [], []
    for j in range(1, steps + 1):
        T = np.diag(a[:j]) + np.diag(b[: j - 1], 1) + np.diag(b[: j - 1], -1)
        w, s = np.linalg.eigh(T)
        tops.append(w[-1])
        certs.append(abs(b[j - 1] * s[-1, -1]) / abs(w[-1]))
    ref = tops[-1]
    rel = np.abs(np.array(tops) - ref) / abs(ref)
    within = next((j + 1 for j in range(steps) if np.all(rel[j:] <= tol)), None)
    certified = next((j + 1 for j in range(steps) if certs[j] <= tol), None)
    return {"top_eigenvalue": float(ref), "final_residual_rel": float(certs[-1]), "steps_run": steps,
            "hvps_within_tol_of_final": within, "hvps_certified_by_ritz_bound": certified,
            "seconds_incl_compile": seconds, "rel_error_at": {str(j): float(rel[j - 1]) for j in (5, 10, 15, 20, 30, 40) if j <= steps}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--lanczos-steps", type=int, default=80, help="0 skips the Lanczos count")
    p.add_argument("--mlp-loop", type=int, default=1000, help="MLP evaluations per compiled call")
    p.add_argument("--skip-conv4", action="store_true")
    p.add_argument("--skip-conv4-timing", action="store_true", help="only the Lanczos count for Conv4")
    args = p.parse_args(argv)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__}

    mlp = maml.nn.MLP(1, 1, (40, 40), key=jax.random.key(0))
    xs = jax.random.uniform(jax.random.key(1), (10, 1), minval=-5, maxval=5)
    mlp_loss = lambda m, d: maml.nn.mse(m, d, 2.0 * jnp.sin(d - 0.5))
    results["mlp"] = hvp_vs_grad(mlp_loss, mlp, xs, args.repeats, loop=args.mlp_loop)
    print("mlp", json.dumps(results["mlp"]), flush=True)
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    task = maml.Task(xs[:5], jnp.sin(xs[:5]), xs[5:], jnp.sin(xs[5:]))
    meta = lambda m, t: maml.meta_loss(m, t, inner)
    results["mlp_meta_loss"] = hvp_vs_grad(meta, mlp, task, args.repeats, loop=args.mlp_loop)
    print("mlp_meta_loss", json.dumps(results["mlp_meta_loss"]), flush=True)

    if not args.skip_conv4:
        conv = maml.nn.Conv4(1, 5, 64, 28, key=jax.random.key(0))
        images = jax.random.normal(jax.random.key(2), (args.batch, 28, 28, 1))
        labels = jnp.arange(args.batch) % 5
        conv_loss = lambda m, d: maml.nn.cross_entropy(m, d[0], d[1])
        if not args.skip_conv4_timing:
            results["conv4"] = {"batch": args.batch, **hvp_vs_grad(conv_loss, conv, (images, labels), args.repeats)}
            print("conv4", json.dumps(results["conv4"]), flush=True)
        if args.lanczos_steps > 0:
            results["conv4_lanczos"] = lanczos_convergence(conv_loss, conv, (images, labels), args.lanczos_steps)
            print("conv4_lanczos", json.dumps(results["conv4_lanczos"]), flush=True)
    return results


if __name__ == "__main__":
    main()
