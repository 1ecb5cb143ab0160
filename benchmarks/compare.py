"""Ours against the PyTorch MAML peers, side by side in one process run, alternating, after warm-up.

`python -m benchmarks.compare [--workloads omniglot-5w1s-2nd,...] [--impls ours,torchfunc,...] [--settle 0,0.5]
[--malloc tuned|default] [--json]`

For each workload: every peer's meta-gradient is first checked against ours in float64 (on 2 tasks), and
our float32 one (the form that is timed) against our float64 one;
then one warm-up step each, then `--repeats` rounds per pause of `--settle`, each running one meta-iteration
of every implementation in turn, with that pause (seconds asleep) before each timed step: 0 measures each
step right after another library's, a pause measures each after the machine went quiet. Every
implementation is reported at the pause that gave it its fastest median, with its rate at each pause and
the CPU time its threads still burned in the pause after its step. Prints median seconds per
meta-iteration, tasks per second, peak memory (for ours the larger of XLA's memory analysis and the
resident-set growth of a compiled step, which sees oneDNN's buffers; the first step's resident-set growth
for peers), the ratio to the fastest peer, and our achieved GFLOP/s (XLA's cost analysis) against
an XLA 1024x1024 matmul on this machine. Without PyTorch installed, ours alone (the peers are notes).
Each workload also reports the share of CPU time the hypervisor stole during its timed rounds (/proc/stat):
a virtual machine sharing its cores is not idle, whatever its load average says; and each implementation's
minor page faults per meta-iteration.
Run from the command line with `--malloc tuned` (the default), the process restarts itself under glibc malloc
settings that keep large freed blocks for reuse (`machine.MALLOC_TUNABLES`): eager PyTorch otherwise faults
in fresh pages for most of its tensors (learn2learn's 5-way second-order step 1.15-1.35x slower); ours does not
change. Our oneDNN convolutions start no OpenMP threads (maml/nn/_onednn.cc), so they leave PyTorch's OpenMP
runtime, which the process shares with them, as it finds it.
With `--json`: one object per line instead of the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maml.nn import Im2Col, Winograd, onednn

from . import peers
from .machine import (MALLOC_TUNABLES, RssPeak, cpu_times, malloc_tuned, matmul_gflops, minor_faults, pause,
                      steal_fraction, with_malloc_tunables)
from .ours import Ours, build_model, torch_params
from .workloads import WORKLOADS, Workload, synthetic_batch

IMPLS = ("ours", "torchfunc", "torchfunc-loop", "higher", "l2l")  # the default --impls
# Ours: the library's default convolutions (None), and Conv4's earlier defaults, to measure what a change bought
# in the same run (`--impls ours,ours-winograd`); the MLP has no convolutions, so those are notes there.
OURS = {
    "ours": None,
    "ours-winograd": (Im2Col(), Winograd(), Winograd(), Winograd()),  # the default of 2026-12-01 to -02
    "ours-im2col": Im2Col(),  # the default before
}
# torch.func's vmap keeps every task's second-order graph at once: 6 GB at 5-way 1-shot, 32 tasks.
TOO_BIG = {("torchfunc", "omniglot-20w1s-5step"): "vmap over 16 tasks x 5 second-order steps needs > 24 GB"}


def _two_tasks(w: Workload) -> tuple[Workload, dict]:
    small = dataclasses.replace(w, meta_batch=2)
    return small, synthetic_batch(small, seed=1, dtype=np.float64)


def ours_meta_grad(w: Workload, model, precision: str = "float64", batching=None) -> dict[str, np.ndarray]:
    """Our mean meta-gradient on 2 tasks of `w` in `precision` ("float64" or "float32"; JAX's default device),
    under torch's names and layouts."""
    small, batch = _two_tasks(w)
    with jax.enable_x64(precision == "float64"):
        return Ours(small, model, batch, batching, dtype=jnp.dtype(precision)).meta_grad()


def peer_meta_grad(w: Workload, peer_cls, model, precision: str = "float64", device: str = "cpu") -> dict[str, np.ndarray]:
    """The peer's mean meta-gradient on the same 2 tasks and parameters as `ours_meta_grad`, on torch `device`."""
    import torch

    small, batch = _two_tasks(w)
    return peer_cls(small, torch_params(model, w), batch, dtype=getattr(torch, precision), device=device).meta_grad()


def relative_error(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((ours[k] - theirs[k]) ** 2)) for k in ours)
    return (num / sum(float(np.sum(ours[k] ** 2)) for k in ours)) ** 0.5


def check_peer(w: Workload, peer_cls, model, tol: float = 1e-6, ours=None) -> float:
    """Relative error of the peer's float64 meta-gradient against ours on 2 tasks (`ours`: `ours_meta_grad`'s,
    computed here when not given); raises if above `tol`."""
    ours = ours_meta_grad(w, model) if ours is None else ours
    err = relative_error(ours, peer_meta_grad(w, peer_cls, model))
    if not err < tol:
        raise RuntimeError(f"{peer_cls.__name__} on {w.name}: meta-gradient relative error {err:.2e} > {tol}")
    return err


def run_workload(w: Workload, impls, repeats: int, check: bool, log, settle=(0.0,)) -> list[dict]:
    model = build_model(w)
    batch = synthetic_batch(w)
    runners, rows, notes, ours_grad = {}, {}, {}, None
    available, missing = peers.available()
    for name in impls:
        if name in OURS:
            if OURS[name] is None:
                runners[name] = Ours(w, model, batch)
            elif w.model == "mlp":
                notes[name] = "skipped: the MLP has no convolutions"
            else:
                runners[name] = Ours(w, build_model(w, conv=OURS[name]), batch)
            continue
        if name not in available:
            notes[name] = f"not installed ({missing.get(name, 'unknown')})"
            continue
        if (name, w.name) in TOO_BIG:
            notes[name] = f"skipped: {TOO_BIG[name, w.name]}"
            continue
        try:
            if check and ours_grad is None:  # once per workload, for every peer
                ours_grad = ours_meta_grad(w, model)
            err = check_peer(w, available[name], model, ours=ours_grad) if check else float("nan")
            import torch  # the peer imported, so torch does

            runners[name] = available[name](w, torch_params(model, w), batch, dtype=torch.float32)
            if check:
                log(f"  {name}: float64 meta-gradient relative error vs ours {err:.1e}")
        except NotImplementedError as e:
            notes[name] = f"skipped: {e}"
        except RuntimeError as e:  # a wrong meta-gradient: reported, not timed
            notes[name] = f"not timed: {e}"
            log(f"  {name}: {e}")
    if check and "ours" in runners:  # the timed float32 path (oneDNN on the CPU) against our float64 one
        ours_grad = ours_meta_grad(w, model) if ours_grad is None else ours_grad
        err32 = relative_error(ours_meta_grad(w, model, "float32"), ours_grad)
        log(f"  ours: float32 meta-gradient relative error vs float64 {err32:.1e}")
        # float32's own error: 3-5e-6 for one-step Omniglot; after several second-order steps it depends on the
        # initialisation and not on the form: 20-way five steps 3.4e-6 to 2.2e-1 over four seeds with batch norm
        # folded or not (higher and learn2learn in float32: 3.5e-2 to 1.8e-1), mini-ImageNet 1.5-2.8e-3
        # (lax.conv's 1.9e-3). A wrong convolution gives order 1 at one step, which the tests check.
        if not err32 < 1e-2:
            raise RuntimeError(f"ours on {w.name}: float32 meta-gradient relative error {err32:.2e} > 1e-2")
    mem, mem_parts = {}, {}
    for name, r in runners.items():  # warm-up (compilation) and memory
        if name in OURS:
            r.step(), r.sync()
            onednn.buffer_bytes(reset=True)
            with RssPeak() as p:  # a compiled step
                r.step(), r.sync()
            # XLA's analysis plus the most oneDNN's own buffers held at once (outside it): an upper bound
            xla, dnn = r.peak_bytes(), onednn.buffer_bytes()[1]
            mem_parts[name] = {"xla_peak_mb": xla / 2**20, "onednn_buffers_mb": dnn / 2**20,
                               "rss_growth_mb": p.growth / 2**20}
            mem[name] = max(xla + dnn, p.growth)
        else:
            with RssPeak() as p:
                r.step()
            mem[name] = p.growth
    stolen_from = cpu_times()
    times = {(name, s): [] for name in runners for s in settle}
    cpu = {(name, s): [] for name in runners for s in settle}
    spin = {(name, s): [] for name in runners for s in settle}
    faults = {(name, s): [] for name in runners for s in settle}
    for _ in range(repeats):
        for s in settle:
            pause(s)
            for name, r in runners.items():
                t, c, f = time.perf_counter(), time.process_time(), minor_faults()
                r.step()
                r.sync()
                times[name, s].append((time.perf_counter() - t) / getattr(r, "steps_per_call", 1))
                cpu[name, s].append((time.process_time() - c) / getattr(r, "steps_per_call", 1))
                faults[name, s].append((minor_faults() - f) / getattr(r, "steps_per_call", 1))
                spin[name, s].append(pause(s))
    steal = steal_fraction(stolen_from, cpu_times())
    log(f"  CPU time stolen by the hypervisor during the timed rounds: {steal:.1%} (a quiet machine: near 0)")
    for name in runners:
        by_settle = {s: statistics.median(times[name, s]) for s in settle}
        best = min(settle, key=by_settle.get)  # each implementation at its fastest protocol
        sec = by_settle[best]
        rows[name] = {"workload": w.name, "impl": name, "sec_per_iter": sec, "tasks_per_s": w.meta_batch / sec,
                      "peak_mem_mb": mem[name] / 2**20, "cpu_s_per_iter": statistics.median(cpu[name, best]),
                      "settle_s": best, "times": times[name, best],
                      "tasks_per_s_by_settle": {str(s): w.meta_batch / t for s, t in by_settle.items()},
                      "cpu_s_in_pause_after": {str(s): statistics.median(spin[name, s]) for s in settle if s > 0},
                      "minor_faults_per_iter": statistics.median(faults[name, best]),
                      "steal_fraction": steal, **mem_parts.get(name, {})}
    peer_rates = [r["tasks_per_s"] for n, r in rows.items() if n not in OURS]
    peer_cpu = [r["cpu_s_per_iter"] for n, r in rows.items() if n not in OURS]
    for r in rows.values():
        r["ratio_to_fastest_peer"] = r["tasks_per_s"] / max(peer_rates) if peer_rates else float("nan")
        r["cpu_ratio_to_fastest_peer"] = min(peer_cpu) / r["cpu_s_per_iter"] if peer_cpu else float("nan")
    if "ours" in runners:
        flops = runners["ours"].flops()  # XLA counts the scan body once: already per iteration
        rows["ours"]["gflop_per_iter"] = flops / 1e9
        rows["ours"]["gflop_per_s"] = flops / rows["ours"]["sec_per_iter"] / 1e9
        rows["ours"]["gflop_per_cpu_s"] = flops / rows["ours"]["cpu_s_per_iter"] / 1e9
    out = list(rows.values())
    out += [{"workload": w.name, "impl": n, "note": why} for n, why in notes.items()]
    return out


def print_table(results, peak, peak_cpu):
    print(f"{'workload':22s} {'impl':15s} {'s/iter':>9s} {'tasks/s':>9s} {'peak MB':>9s} {'vs fastest peer':>15s}"
          f" {'CPU s/iter':>10s} {'CPU ratio':>9s}  tasks/s by pause (CPU-s burned in the pause after)")
    for r in results:
        if "note" in r:
            print(f"{r['workload']:22s} {r['impl']:15s} {r['note']}")
            continue
        extra = "  " + ", ".join(
            f"{s} s: {rate:.1f}" + (f" ({r['cpu_s_in_pause_after'][s]:.2f})" if s in r["cpu_s_in_pause_after"] else "")
            for s, rate in r["tasks_per_s_by_settle"].items())
        extra += f"; {r['minor_faults_per_iter']:,.0f} page faults/iter"
        if "gflop_per_s" in r:
            extra += (f"; {r['gflop_per_iter']:.2f} GFLOP/iter, {r['gflop_per_s']:.1f} GFLOP/s = "
                     f"{r['gflop_per_s'] / peak:.0%} of matmul; per CPU-s {r['gflop_per_cpu_s']:.1f} = "
                     f"{r['gflop_per_cpu_s'] / peak_cpu:.0%}")
        if "xla_peak_mb" in r:
            extra += (f"; memory: XLA {r['xla_peak_mb']:.0f} MB + oneDNN's buffers {r['onednn_buffers_mb']:.0f} MB, "
                      f"a step's RSS growth {r['rss_growth_mb']:.0f} MB")
        print(f"{r['workload']:22s} {r['impl']:15s} {r['sec_per_iter']:9.4f} {r['tasks_per_s']:9.1f} "
              f"{r['peak_mem_mb']:9.0f} {_ratio(r['ratio_to_fastest_peer']):>15s} {r['cpu_s_per_iter']:10.4f} "
              f"{_ratio(r['cpu_ratio_to_fastest_peer']):>9s}{extra}")


def _ratio(x: float) -> str:
    """`1.23x`, or `no peer` where no peer ran (the ratio is NaN)."""
    return "no peer" if math.isnan(x) else f"{x:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="skip the float64 meta-gradient check of peers")
    p.add_argument("--settle", default="0,0.5",
                   help="comma-separated pauses in seconds before each timed step, each a protocol of its own rounds; "
                        "every implementation is reported at its fastest")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: restart under machine.MALLOC_TUNABLES (PyTorch's best; command-line runs only); "
                        "default: glibc's own settings")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if argv is None and args.malloc == "tuned" and not malloc_tuned():  # glibc reads its tunables at startup
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.compare", *sys.argv[1:]], with_malloc_tunables())
    try:
        settle = tuple(float(s) for s in args.settle.split(","))
    except ValueError:
        p.error(f"--settle: {args.settle!r}; expected comma-separated seconds, e.g. 0,0.5")
    if not all(0 <= s < 60 for s in settle):
        p.error(f"--settle: {args.settle!r}; expected pauses of 0 to 60 seconds")
    workloads = args.workloads.split(",")
    impls = args.impls.split(",")
    for name in workloads:
        if name not in WORKLOADS:
            p.error(f"--workloads: {name!r}; expected names from {sorted(WORKLOADS)}")
    for name in impls:
        if name not in {*IMPLS, *OURS}:
            p.error(f"--impls: {name!r}; expected names from {(*IMPLS, *(n for n in OURS if n not in IMPLS))}")
    log = (lambda s: None) if args.json else print
    peak, peak_cpu = matmul_gflops()
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
        f"torch {torch_version}; XLA 1024^2 matmul {peak:.0f} GFLOP/s ({peak_cpu:.0f} per CPU-s); "
        f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}; malloc: "
        + (f"GLIBC_TUNABLES={MALLOC_TUNABLES}" if malloc_tuned() else "glibc's defaults"))
    results = []
    for name in workloads:
        log(f"{name}:")
        rows = run_workload(WORKLOADS[name], impls, args.repeats, not args.no_check, log, settle)
        results += rows
        if args.json:
            for r in rows:
                r = {k: v for k, v in r.items() if k != "times"}
                print(json.dumps({**r, "matmul_gflop_per_s": peak, "matmul_gflop_per_cpu_s": peak_cpu,
                                  "malloc_tuned": malloc_tuned()}), flush=True)
    if not args.json:
        print_table(results, peak, peak_cpu)


if __name__ == "__main__":
    main()
