"""Ours against the PyTorch peers on one accelerator, side by side in one process run, alternating after warm-up.

On a GPU machine with JAX and PyTorch (CUDA) installed, from the repository root (`higher` is pure Python:
where it is not installed, carry its wheel and put it on PYTHONPATH):

    python -m benchmarks.gpu --out gpu.json            # about 8 minutes at most (--budget-s)
    python -m benchmarks.gpu --small --out gpu.json    # the same code at tiny sizes, on any machine (tests do this)

Workloads (benchmarks.workloads): Omniglot 5-way 1-shot Conv4, second and first order, meta-batch 32; 20-way
1-shot 5 steps, meta-batch 16; mini-ImageNet-shaped Conv4 (84x84x3, 32 filters) 5-way 1-shot 5 steps,
meta-batch 4; sinusoid, meta-batch 25 (synthetic data throughout). Implementations: ours with `Vmap` and with
`Map` (the library's default convolutions: `Im2Col` for the first block, then `OneDNN`, which off the CPU
runs its JAX fallback `Winograd`), ours with `Vmap`
and `LaxConv` (the platform's convolution), and higher, torch.func vmapped and looped, learn2learn, each where
it imports.

For each workload: every peer's float32 meta-gradient is checked against ours on the same parameters and data
on the device (2 tasks; the relative error is reported, and above `--tol` the peer is not timed); one warm-up
step each (compilation), then rounds of one meta-iteration of every implementation in turn until the
workload's share of the time budget is spent. Reported: median seconds per meta-iteration, tasks/s, peak
device memory (XLA's memory analysis for ours, `torch.cuda.max_memory_allocated` for the peers; on a CPU
the step's resident-set growth), the ratio to the fastest peer, and for ours the achieved share of the
device's float32 matmul rate (XLA's cost analysis over a measured large matmul). Writes one JSON (rewritten
after each workload, so a run cut short keeps what it measured) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

import maml

from . import peers
from .compare import ours_meta_grad, peer_meta_grad, relative_error
from .machine import RssPeak, matmul_gflops
from .ours import Ours, build_model, torch_params
from .workloads import WORKLOADS, Workload, synthetic_batch

# Ours: (batching, convolution form, None for the library's default); the form does not apply to the MLP.
OURS = {
    "ours-vmap": (maml.Vmap(), None),
    "ours-map": (maml.Map(), None),
    "ours-vmap-laxconv": (maml.Vmap(), maml.nn.LaxConv()),
}
IMPLS = (*OURS, *peers.PEERS)
# jax_default_matmul_precision and torch's TF32 switches, set alike on both sides.
PRECISIONS = {"highest": ("highest", False), "tf32": ("tensorfloat32", True)}


def small(w: Workload) -> Workload:
    """`w` at tiny sizes (4 filters, 16x16 images, 2 tasks, 1 step): the script's code paths in seconds."""
    return dataclasses.replace(w, meta_batch=2, queries=2, steps=1, image_size=16, filters=4)


def set_precision(name: str) -> None:
    jax_precision, tf32 = PRECISIONS[name]
    jax.config.update("jax_default_matmul_precision", jax_precision)
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PeakMemory:
    """Peak memory of one call: `torch.cuda.max_memory_allocated` on CUDA, resident-set growth on a CPU."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> int:
        if self.device != "cuda":
            with RssPeak() as p:
                fn()
            return p.growth
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def build_runners(w: Workload, impls, tol: float, log) -> tuple[dict, dict, dict]:
    """`(runners, {impl: gradient relative error}, {impl: why not timed})` for workload `w`."""
    runners, errors, notes = {}, {}, {}
    batch = synthetic_batch(w)
    for name in impls:
        if name not in OURS:
            continue
        batching, conv = OURS[name]
        if w.model == "mlp" and name != "ours-vmap":
            notes[name] = "skipped: the MLP has no convolutions, and ours-vmap is its form"
            continue
        runners[name] = Ours(w, build_model(w, conv=conv), batch, batching)
    wanted = [n for n in impls if n in peers.PEERS]
    if not wanted:
        return runners, errors, notes
    try:
        import torch
    except ImportError as e:
        return runners, errors, {**notes, **{n: f"not installed ({e})" for n in wanted}}
    device = torch_device()
    model = build_model(w)
    ours = ours_meta_grad(w, model, "float32")
    available, missing = peers.available()
    for name in wanted:
        if name not in available:
            notes[name] = f"not installed ({missing.get(name, 'unknown')})"
            continue
        try:
            errors[name] = relative_error(ours, peer_meta_grad(w, available[name], model, "float32", device))
            log(f"  {name}: float32 meta-gradient relative error vs ours on the device {errors[name]:.1e}")
            if not errors[name] <= tol:
                notes[name] = f"not timed: float32 meta-gradient relative error {errors[name]:.1e} > {tol:g}"
                continue
            runners[name] = available[name](w, torch_params(model, w), batch, dtype=torch.float32, device=device)
        except NotImplementedError as e:
            notes[name] = f"skipped: {e}"
    return runners, errors, notes


def time_workload(w: Workload, runners: dict, seconds: float, min_rounds: int, peak_memory: PeakMemory) -> dict:
    """Warm up each runner (and measure its memory), then alternate rounds until `seconds` have passed
    (at least `min_rounds`); per-iteration seconds of every round, by runner."""
    mem = {}
    for name, r in runners.items():
        if isinstance(r, Ours):
            r.step(), r.sync()
            mem[name] = r.peak_bytes()
        else:
            mem[name] = peak_memory(lambda: (r.step(), r.sync()))
    times = {name: [] for name in runners}
    start, rounds = time.perf_counter(), 0
    while runners and (rounds < min_rounds or time.perf_counter() - start < seconds):
        rounds += 1
        for name, r in runners.items():
            t = time.perf_counter()
            r.step()
            r.sync()
            times[name].append((time.perf_counter() - t) / getattr(r, "steps_per_call", 1))
    return {name: {"times": times[name], "peak_bytes": mem[name]} for name in runners}


def rows_of(w: Workload, runners: dict, timed: dict, errors: dict, notes: dict, peak_gflops: float) -> list[dict]:
    rows = {}
    for name, r in runners.items():
        sec = statistics.median(timed[name]["times"])
        rows[name] = {"workload": w.name, "impl": name, "sec_per_iter": sec, "tasks_per_s": w.meta_batch / sec,
                      "peak_mem_mb": timed[name]["peak_bytes"] / 2**20, "rounds": len(timed[name]["times"])}
        if name in errors:
            rows[name]["grad_rel_err"] = errors[name]
        if isinstance(r, Ours):
            gflops = r.flops() / r.steps_per_call / 1e9
            rows[name]["gflop_per_iter"] = gflops
            rows[name]["share_of_f32_matmul"] = gflops / sec / peak_gflops
    fastest = max((r["tasks_per_s"] for n, r in rows.items() if n not in OURS), default=None)
    for r in rows.values():
        r["ratio_to_fastest_peer"] = r["tasks_per_s"] / fastest if fastest else None
    return list(rows.values()) + [{"workload": w.name, "impl": n, "note": why} for n, why in notes.items()]


def machine(precision: str, peak_gflops: float) -> dict:
    info = {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_device": jax.devices()[0].device_kind, "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "precision": precision, "f32_matmul_gflop_per_s": peak_gflops, "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    info["torch_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def print_table(info: dict, rows: list[dict]) -> None:
    print(f"{info['jax_device']} ({info['jax_backend']}), jax {info['jax']}, torch {info.get('torch', '-')} on "
          f"{info.get('torch_device', '-')}; precision {info['precision']}; float32 matmul "
          f"{info['f32_matmul_gflop_per_s']:.0f} GFLOP/s; {info['date']}")
    print(f"{'workload':24s} {'impl':18s} {'s/iter':>9s} {'tasks/s':>9s} {'peak MB':>9s} {'vs fastest peer':>15s} "
          f"{'grad err':>9s} {'f32 share':>9s}")
    for r in rows:
        if "note" in r:
            print(f"{r['workload']:24s} {r['impl']:18s} {r['note']}")
            continue
        ratio = "-" if r["ratio_to_fastest_peer"] is None else f"{r['ratio_to_fastest_peer']:.2f}x"
        err = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "-"
        share = f"{r['share_of_f32_matmul']:.1%}" if "share_of_f32_matmul" in r else "-"
        print(f"{r['workload']:24s} {r['impl']:18s} {r['sec_per_iter']:9.5f} {r['tasks_per_s']:9.1f} "
              f"{r['peak_mem_mb']:9.1f} {ratio:>15s} {err:>9s} {share:>9s}")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from " + ", ".join(WORKLOADS))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, from " + ", ".join(IMPLS))
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for all workloads' checks, warm-ups and rounds (the remainder is shared out)")
    p.add_argument("--min-rounds", type=int, default=3, help="timed rounds per workload at least")
    p.add_argument("--precision", default="highest", choices=sorted(PRECISIONS),
                   help="float32 matmuls and convolutions: full float32 ('highest') or tensor-float-32, alike on both sides")
    p.add_argument("--tol", type=float, default=1e-3, help="largest float32 meta-gradient relative error timed")
    p.add_argument("--small", action="store_true", help="tiny sizes: the same code paths in seconds (for a CPU)")
    p.add_argument("--out", type=Path, default=Path("gpu.json"), help="the JSON written")
    args = p.parse_args(argv)
    for flag, names, known in (("--workloads", args.workloads, WORKLOADS), ("--impls", args.impls, IMPLS)):
        for name in names.split(","):
            if name not in known:
                p.error(f"{flag}: {name!r}; expected names from {', '.join(known)}")
    if not args.budget_s > 0 or args.min_rounds < 1:
        p.error(f"--budget-s {args.budget_s} and --min-rounds {args.min_rounds}: expected positive values")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    log = lambda s: print(s, flush=True)
    set_precision(args.precision)
    peak_gflops = matmul_gflops(512 if args.small else 8192, repeats=5)[0]
    info = machine(args.precision, peak_gflops)
    workloads = [small(WORKLOADS[n]) if args.small else WORKLOADS[n] for n in args.workloads.split(",")]
    impls = args.impls.split(",")
    peak_memory = PeakMemory(torch_device() if importlib.util.find_spec("torch") else "cpu")
    rows: list[dict] = []
    for i, w in enumerate(workloads):
        left = args.budget_s - (time.perf_counter() - start)
        log(f"{w.name}: {left / (len(workloads) - i):.0f} s of the remaining {left:.0f}")
        workload_start = time.perf_counter()
        runners, errors, notes = build_runners(w, impls, args.tol, log)
        for name, r in runners.items():  # compile (and warm up) before the clock of the rounds starts
            if isinstance(r, Ours):
                r.compiled()
        setup = time.perf_counter() - workload_start
        timed = time_workload(w, runners, left / (len(workloads) - i) - setup, args.min_rounds, peak_memory)
        rows += rows_of(w, runners, timed, errors, notes, peak_gflops)
        args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print_table(info, rows)
    log(f"wrote {args.out} after {time.perf_counter() - start:.0f} s")
    return {"machine": info, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
