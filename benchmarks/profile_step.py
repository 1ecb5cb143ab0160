"""Where our compiled meta-training step spends its time: XLA's per-operation trace, grouped.

`python -m benchmarks.profile_step [--workload omniglot-5w1s-2nd] [--meta-batch 8] [--steps 2] [--top 25]`

Runs the step of `benchmarks.compare` (the library's defaults for the workload) under `jax.profiler`,
reads the Perfetto trace XLA's CPU runtime writes (one event per executed thunk: a fusion, a matmul, a copy),
and prints each operation's time per task with the shape it produces and the JAX operation it came from
(the HLO's `op_name`), then the totals by kind (`ynn_fusion` are the matmuls, `concatenate` / `pad_slice` the
im2col copies, ...). On a shared machine the absolute figures move; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile

import jax

from .ours import Ours, build_model
from .workloads import WORKLOADS, synthetic_batch


def thunk_times(trace_dir: str, instructions) -> collections.Counter:
    """Total microseconds by HLO instruction in the Perfetto trace under `trace_dir`: the events named after an
    instruction of `instructions` (one per executed thunk), innermost only (a while loop's event holds its
    body's), so nothing counts twice."""
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["name"] in instructions:
            by_thread[e.get("pid"), e.get("tid")].append(e)
    out = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        for e, nxt in zip(evs, evs[1:] + [None]):
            if nxt is None or nxt["ts"] >= e["ts"] + e.get("dur", 0):
                out[e["name"]] += e.get("dur", 0)
    return out


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """`{instruction name: (result shape, JAX op_name)}` from an optimised HLO module's text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([^\n]*)", hlo_text, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1)] = (m.group(2), op.group(1).split("/", 1)[-1] if op else "")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="omniglot-5w1s-2nd", choices=sorted(WORKLOADS))
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="profiled meta-iterations (after two warm-up ones)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    w = dataclasses.replace(WORKLOADS[args.workload], meta_batch=args.meta_batch)
    ours = Ours(w, build_model(w), synthetic_batch(w))
    for _ in range(2):
        ours.step(), ours.sync()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                ours.step(), ours.sync()
        index = hlo_index(ours.compiled().as_text())
        times = thunk_times(trace_dir, index)
    per_task = lambda us: us / 1e3 / args.steps / (w.meta_batch * ours.steps_per_call)
    total = sum(times.values())
    print(f"{w.name}, meta-batch {w.meta_batch}: {per_task(total):.1f} ms of operations per task")
    for name, us in times.most_common(args.top):
        shape, op = index.get(name, ("", ""))
        print(f"{per_task(us):8.2f} ms {us / total:6.1%}  {name:34s} {shape:28s} {op[:70]}")
    kinds = collections.Counter()
    for name, us in times.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    print("by kind:")
    for kind, us in kinds.most_common(12):
        print(f"{per_task(us):8.2f} ms {us / total:6.1%}  {kind}")


if __name__ == "__main__":
    main()
