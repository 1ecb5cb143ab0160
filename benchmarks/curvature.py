"""Cost of curvature diagnostics (one HVP as a multiple of one gradient, Lanczos steps to 1e-3), and the
accuracy of the SLQ negative mass against dense Hessians.

    python -m benchmarks.curvature [--repeats 7] [--batch 25] [--lanczos-steps 80] [--mlp-loop 1000] [--skip-conv4]
    python -m benchmarks.curvature --accuracy [--data-dir ../shared/data/omniglot] [--tasks 4] [--pool 64]

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
3. `--accuracy` (no timing): trains the tiny models of the tests into a temporary folder (the sinusoid
   MLPs 1-8-8-1 after 20 MAML iterations and 1-40-40-1 after 2,000, and with `--data-dir` a Conv4 with 4
   filters after 30 iterations of 5-way 1-shot Omniglot) and, on `--tasks` held-out tasks of each, compares
   the SLQ negative mass of the support loss and of the meta-objective (float32 HVPs in the mode
   experiments.curvature uses) with `negative_fraction` of `numpy.linalg.eigvalsh` of the dense float64
   Hessian, for every probes x steps: a pool of `--pool` probes per task, split into disjoint groups of P
   probes (one SLQ estimate each; Lanczos is nested, so m steps are the leading m x m block of one run).
   Reports the 95th percentile and the largest absolute error over tasks x groups, the mean reported
   standard error, and for comparison the error of the old definition (the quadrature weight of the nodes
   below -sqrt(eps) max |node|) against the dense fraction below -sqrt(eps) max |eigenvalue|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import maml
from maml import curvature as C
from maml.curvature import gauss_quadrature, lanczos


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


def _dense_eigenvalues(objective, model, task, inner) -> np.ndarray:
    """`numpy.linalg.eigvalsh` of the float64 Hessian of `objective(model, task, inner)` (dense, jax.hessian)."""
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a
        m64 = jax.tree.map(lambda a: to64(a) if eqx.is_inexact_array(a) else a, model)
        f, params = objective(m64, jax.tree.map(to64, task), inner)
        x, unravel = ravel_pytree(params)
        H = np.asarray(jax.jit(jax.hessian(lambda u: f(unravel(u))))(x), np.float64)
    return np.linalg.eigvalsh((H + H.T) / 2)


def _quadratures(objective, model, task, inner, mode, key, pool: int, steps: tuple[int, ...]):
    """Per step count m: Gauss quadratures `(nodes [pool, m], weights [pool, m])` of `pool` Rademacher probes,
    all from one Lanczos run of `max(steps)` steps per probe (the m-step run is its leading m x m block)."""
    from maml.curvature.krylov import LanczosState
    from maml.curvature.operators import flat_operator

    @eqx.filter_jit
    def run(model, task, key):
        f, params = objective(model, task, inner)
        mv, x, _ = flat_operator(f, params, mode, "benchmark")

        def one(k):
            k0, k1 = jax.random.split(k)
            s = lanczos(mv, jax.random.rademacher(k0, x.shape, x.dtype), max(steps), key=k1)
            return {m: gauss_quadrature(LanczosState(s.basis[:m], s.alpha[:m], s.beta[:m], s.alpha_lo[:m], s.beta_lo[:m]))
                    for m in steps}

        return jax.vmap(one)(jax.random.split(key, pool))

    return jax.tree.map(np.asarray, run(model, task, key))


def _old_negative_mass(nodes, weights) -> float:
    """The definition before issue 19: quadrature weight of the nodes below -sqrt(eps) max |node|."""
    thresh = np.finfo(np.float32).eps ** 0.5 * np.max(np.abs(nodes))
    return float(np.mean(np.sum(np.where(nodes < -thresh, weights, 0.0), axis=-1)))


def negative_mass_accuracy(runs: dict, num_tasks: int, pool: int, probes=(1, 2, 4, 8),
                           steps=(10, 15, 20, 30, 40, 60)) -> dict:
    """For each run (name -> run folder), objective and probes x steps: errors of the SLQ negative mass
    against the dense figure over `num_tasks` held-out tasks x disjoint groups of a `pool` of probes."""
    from experiments import curvature

    out = {}
    for name, run in runs.items():
        loaded = curvature.load(run, None)
        tasks = loaded.sample(jax.random.key(1234), num_tasks)
        mode = curvature.MODE[loaded.kind]
        for oname, objective in (("support", C.support_objective), ("meta", C.meta_objective)):
            rows = {}
            dense, sharp = [], []
            for t in range(num_tasks):
                task = jax.tree.map(lambda a: a[t], tasks)
                w = _dense_eigenvalues(objective, loaded.model, task, loaded.inner)
                dense.append(float(C.negative_fraction(w)))
                sharp.append(float(np.mean(w < -np.finfo(np.float32).eps ** 0.5 * np.abs(w).max())))
                ms = tuple(m for m in steps if m <= w.size)
                quad = _quadratures(objective, loaded.model, task, loaded.inner, mode, jax.random.key(t), pool, ms)
                for m in ms:
                    nodes, weights = quad[m]
                    for p in probes:
                        groups = pool // p
                        g_nodes = nodes[: groups * p].reshape(groups, p, m)
                        g_weights = weights[: groups * p].reshape(groups, p, m)
                        d = jax.vmap(lambda a, b: C.SpectralDensity.from_quadrature(a, b, num_points=2))(g_nodes, g_weights)
                        row = rows.setdefault(f"{p}x{m}", {"err": [], "stderr": [], "old_err": []})
                        row["err"] += list(np.abs(np.asarray(d.negative_mass) - dense[-1]))
                        row["stderr"] += list(np.asarray(d.negative_mass_stderr))
                        row["old_err"] += [abs(_old_negative_mass(a, b) - sharp[-1]) for a, b in zip(g_nodes, g_weights)]
            summary = {k: {"p95_abs_error": float(np.quantile(v["err"], 0.95)), "max_abs_error": float(np.max(v["err"])),
                           "mean_stderr": float(np.mean(v["stderr"])) if k.split("x")[0] != "1" else None,
                           "old_p95_abs_error": float(np.quantile(v["old_err"], 0.95))} for k, v in rows.items()}
            out[f"{name}/{oname}"] = {"num_params": int(ravel_pytree(eqx.filter(loaded.model, eqx.is_inexact_array))[0].size),
                                      "dense": dense, "dense_sharp": sharp, "slq": summary}
            print(name, oname, json.dumps({"dense": dense, "dense_sharp": sharp}), flush=True)
            for k, v in summary.items():
                print(f"  {k:>5}: p95 {v['p95_abs_error']:.3f} max {v['max_abs_error']:.3f} mean se "
                      f"{v['mean_stderr'] if v['mean_stderr'] is None else round(v['mean_stderr'], 3)} | old p95 "
                      f"{v['old_p95_abs_error']:.3f}", flush=True)
    return out


def train_tiny_runs(folder: Path, data_dir: Optional[str]) -> dict:
    """The tiny models the accuracy table is measured on, trained into `folder`: name -> run folder."""
    from experiments import omniglot, sinusoid

    quiet = ["--no-progress", "--wandb", "disabled"]
    evals = ["--eval-tasks", "4", "--eval-points", "4", "--eval-steps", "0,1", "--baseline-iterations", "10"]
    runs = {"sinusoid 1-8-8-1, 20 it": folder / "sin8", "sinusoid 1-40-40-1, 2000 it": folder / "sin40"}
    sinusoid.main(["--iterations", "20", "--steps-per-call", "10", "--checkpoint-every", "20", "--hidden", "8,8",
                   *evals, *quiet, "--out", str(runs["sinusoid 1-8-8-1, 20 it"])])
    sinusoid.main(["--iterations", "2000", "--steps-per-call", "500", "--checkpoint-every", "2000", *evals, *quiet,
                   "--out", str(runs["sinusoid 1-40-40-1, 2000 it"])])
    if data_dir is not None:
        runs["Conv4 4 filters, 5-way 1-shot, 30 it"] = folder / "conv4"
        omniglot.main(["--data-dir", data_dir, "--cache-dir", str(folder / "tfds"), "--filters", "4", "--meta-batch", "2",
                       "--queries", "5", "--iterations", "30", "--steps-per-call", "10", "--val-every", "30",
                       "--val-tasks", "2", "--eval-tasks", "2", *quiet, "--out", str(runs["Conv4 4 filters, 5-way 1-shot, 30 it"])])
    return runs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--lanczos-steps", type=int, default=80, help="0 skips the Lanczos count")
    p.add_argument("--mlp-loop", type=int, default=1000, help="MLP evaluations per compiled call")
    p.add_argument("--skip-conv4", action="store_true")
    p.add_argument("--skip-conv4-timing", action="store_true", help="only the Lanczos count for Conv4")
    p.add_argument("--accuracy", action="store_true", help="only the negative-mass accuracy table (no timing)")
    p.add_argument("--data-dir", default=None, help="--accuracy: Omniglot zips (for the Conv4 rows; without: sinusoid only)")
    p.add_argument("--tasks", type=int, default=4, help="--accuracy: held-out tasks per model")
    p.add_argument("--pool", type=int, default=64, help="--accuracy: probes per task, split into groups")
    args = p.parse_args(argv)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    if args.accuracy:
        with tempfile.TemporaryDirectory() as folder:
            runs = train_tiny_runs(Path(folder), args.data_dir)
            results["negative_mass_accuracy"] = negative_mass_accuracy(runs, args.tasks, args.pool)
        return results

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
