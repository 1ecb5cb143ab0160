"""Peak memory of one meta-gradient versus the number of inner steps, from XLA's compiled memory analysis.

    python -m benchmarks.memory [--steps 1,5,10,25,50] [--hidden 512,512] [--meta-batch 25] [--shots 10]

Second-order MAML with the inner loop plain (every step's intermediates kept: O(K)), rematerialised per
step (`checkpoint_every=1`) and in segments of ceil(sqrt K) steps; first-order MAML and iMAML (inner loop
not differentiated) for reference. Nothing runs: each jitted `meta_value_and_grad` (sinusoid tasks, an
MLP) is lowered and compiled, and `compiled.memory_analysis()` gives its buffers. Peak = arguments +
outputs + temporaries (XLA's buffer assignment; an upper bound on live memory). Prints a Markdown table
and, with `--out`, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import maml
from data.sinusoid import sample_tasks


def peak_bytes(fn, *args) -> dict:
    """Compile `fn(*args)` (jit) without running it; XLA's memory statistics in bytes."""
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def variants(steps: int, lr: float, lam: float):
    """(name, inner loop, strategy) for one number of inner steps."""
    loop = maml.InnerLoop(maml.nn.mse, steps, lr)
    seg = max(1, math.ceil(math.sqrt(steps)))
    return [
        ("2nd order, plain", loop, maml.SecondOrder()),
        ("2nd order, remat per step", maml.InnerLoop(maml.nn.mse, steps, lr, checkpoint_every=1), maml.SecondOrder()),
        ("2nd order, remat sqrt(K)-segments", maml.InnerLoop(maml.nn.mse, steps, lr, checkpoint_every=seg), maml.SecondOrder()),
        ("1st order (FOMAML)", loop, maml.FirstOrder()),
        ("iMAML (CG 5)", loop, maml.Implicit(lam=lam, cg_steps=5)),
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="1,5,10,25,50")
    p.add_argument("--hidden", default="512,512")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    steps_list = [int(s) for s in args.steps.split(",")]
    hidden = tuple(int(h) for h in args.hidden.split(","))
    key = jax.random.PRNGKey(0)
    model = maml.nn.MLP(1, 1, hidden, key=key)
    tasks = sample_tasks(key, args.meta_batch, args.shots, args.shots)[0]
    n_params = sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    rows = []
    for steps in steps_list:
        for name, inner, strategy in variants(steps, 0.01, 20.0):
            t = time.perf_counter()
            fn = lambda m, ts: maml.meta_value_and_grad(m, ts, inner, strategy=strategy)
            stats = peak_bytes(fn, model, tasks)
            rows.append({"variant": name, "steps": steps, **stats, "compile_s": round(time.perf_counter() - t, 1)})
            print(f"{name:36s} K={steps:3d} peak {stats['peak'] / 2**20:9.1f} MiB "
                  f"(temp {stats['temp'] / 2**20:9.1f} MiB) compile {rows[-1]['compile_s']}s", flush=True)
    setting = {"model": f"MLP 1-{'-'.join(map(str, hidden))}-1 ({n_params} params)", "meta_batch": args.meta_batch,
               "shots": args.shots, "device": str(jax.devices()[0]), "dtype": str(jnp.zeros(()).dtype),
               "jax": jax.__version__}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    table = ["| variant | " + " | ".join(f"K={s}" for s in steps_list) + " |",
             "|---|" + "---:|" * len(steps_list)]
    for n in names:
        cells = [next(r for r in rows if r["variant"] == n and r["steps"] == s)["peak"] / 2**20 for s in steps_list]
        table.append(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print(json.dumps(setting))
    print("\n".join(table))
    result = {"setting": setting, "rows": rows, "table_mib": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
