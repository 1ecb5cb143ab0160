"""Meta-step throughput of the data-parallel steps (`maml.parallel`) against the number of devices.

    python -m benchmarks.parallel [--cpu-devices 4] [--devices 1,2,4] [--batch 32] [--steps 200] [--repeats 3]

Sinusoid MAML (MLP 1-40-40-1, K=10 support and 10 query points, one second-order inner step, Adam), the
task batch split across devices. For each device count: the single-device step (1 only), `pmap` and the
sharded step, `--steps` meta-steps per compiled `lax.scan` (as `maml.fit` runs them), compilation
excluded (all compiled first), the median of `--repeats` timed calls taken round-robin. Prints a
Markdown table (meta-steps/s, tasks/s, and the ratio to the single-device step). `--cpu-devices N`
fakes N CPU devices (they share the host's cores, so this measures the parallel steps' overhead, not a
speed-up); without it, the real devices (e.g. GPUs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake this many CPU devices")
    parser.add_argument("--devices", default=None, help="device counts, e.g. 1,2,4 (default: powers of 2)")
    parser.add_argument("--batch", type=int, default=32, help="tasks per meta-step (divisible by each count)")
    parser.add_argument("--steps", type=int, default=200, help="meta-steps per compiled call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration")
    parser.add_argument("--forms", default="single,pmap,sharded", help="which steps to time")
    # Set by `python -m launch.multihost`: then only the sharded step, over every process's devices.
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.cpu_devices:  # before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import equinox as eqx
    import jax
    import optax

    import maml
    from data.sinusoid import SinusoidTasks
    from experiments import runtime

    runtime.initialize(runtime.RuntimeConfig(coordinator=args.coordinator, num_processes=args.num_processes,
                                             process_id=args.process_id))
    available = jax.device_count()
    counts = ([int(c) for c in args.devices.split(",")] if args.devices
              else [2 ** i for i in range(available.bit_length()) if 2 ** i <= available])
    if jax.process_count() > 1:
        args.forms, counts = "sharded", [available]
    optimizer = optax.adam(1e-3)
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    model = maml.nn.MLP(1, 1, (40, 40), key=jax.random.PRNGKey(0))
    state = maml.init_state(model, optimizer, jax.random.PRNGKey(1))
    sampler = SinusoidTasks(args.batch, 10, 10)
    makers = {
        "single": lambda n: maml.with_task_sampler(maml.make_train_step(optimizer, inner)),
        "pmap": lambda n: maml.parallel.train_step(optimizer, inner, num_devices=n, over=maml.parallel.Pmap()),
        "sharded": lambda n: maml.parallel.train_step(optimizer, inner, num_devices=n),
    }
    forms = args.forms.split(",")
    configs = [(form, n) for n in counts for form in forms if form != "single" or n == 1]
    runs, compile_s, times = {}, {}, {c: [] for c in configs}
    for form, n in configs:  # compile everything first
        runs[form, n] = eqx.filter_jit(maml.scan_steps(makers[form](n), args.steps))
        start = time.perf_counter()
        jax.block_until_ready(runs[form, n](state, sampler))
        compile_s[form, n] = time.perf_counter() - start
    for _ in range(args.repeats):  # then time them round-robin, so that load drifts hit all alike
        for c in configs:
            start = time.perf_counter()
            jax.block_until_ready(runs[c](state, sampler))
            times[c].append(time.perf_counter() - start)
    rows = []
    for (form, n) in configs:
        seconds = statistics.median(times[form, n])
        rows.append({"form": form, "devices": n, "steps_per_s": args.steps / seconds,
                     "tasks_per_s": args.steps * args.batch / seconds, "compile_s": compile_s[form, n]})
        print(f"{form:8s} {n} device(s): {args.steps / seconds:8.1f} meta-steps/s", file=sys.stderr, flush=True)
    if not runtime.is_writer():
        return rows
    base = next((r["steps_per_s"] for r in rows if r["form"] == "single"), None)
    device = jax.devices()[0]
    print(f"\n{device.platform} ({getattr(device, 'device_kind', '')}), {available} device(s) in "
          f"{jax.process_count()} process(es), "
          f"{os.cpu_count()} host cores ({platform.processor() or platform.machine()}), jax {jax.__version__}; "
          f"batch {args.batch}, {args.steps} steps per call, median of {args.repeats}\n")
    print("| step | devices | meta-steps/s | tasks/s | vs single | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['steps_per_s'] / base:.2f}" if base else "-"
        print(f"| {r['form']} | {r['devices']} | {r['steps_per_s']:.1f} | {r['tasks_per_s']:.0f} | {ratio} | "
              f"{r['compile_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
