"""What the machine gives a benchmark: XLA's matmul rate, a block's resident-set growth, the CPU time the
hypervisor stole, page faults, a pause that counts the CPU time burned during it, and the allocator settings
under which eager PyTorch runs at its best."""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import threading
import time

import jax


def matmul_gflops(n: int = 1024, repeats: int = 20) -> tuple[float, float]:
    """XLA float32 n x n matmul rate on this machine (median of `repeats`): per wall second and per
    CPU second of this process (the latter is steadier on a shared machine)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    ts, cs = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return 2 * n**3 / statistics.median(ts) / 1e9, 2 * n**3 / statistics.median(cs) / 1e9


class RssPeak:
    """Peak resident-set growth (bytes) while the block runs, sampled every millisecond."""

    def __enter__(self):
        import psutil

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so growth is measurable
        except OSError:
            pass
        self.proc = psutil.Process(os.getpid())
        self.base = self.peak = self.proc.memory_info().rss
        self.done = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.growth = self.peak - self.base


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far (/proc/stat; zeros where it does not exist): steal is time the
    hypervisor gave these virtual CPUs to other guests."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of CPU time stolen by the hypervisor between two `cpu_times()` (nan where none was counted)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped and zeroed on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's malloc by default gives large freed blocks back to the kernel (the heap's top trimmed, big blocks
# unmapped), and their pages fault in, zeroed, on the next first touch; eager PyTorch allocates its activations
# and gradients anew for every operation, so its Conv4 steps fault in ~1.6 GB per meta-iteration. A fixed 32 MB
# mmap threshold with the heap never trimmed keeps those blocks for reuse (benchmarks/RESULTS.md, section 1).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def malloc_tuned(environ=os.environ) -> bool:
    """Whether this process started with `MALLOC_TUNABLES` (glibc reads them at startup only)."""
    return all(t in environ.get("GLIBC_TUNABLES", "").split(":") for t in MALLOC_TUNABLES.split(":"))


def with_malloc_tunables(environ=os.environ) -> dict[str, str]:
    """A copy of `environ` whose `GLIBC_TUNABLES` includes `MALLOC_TUNABLES` (after any others it had)."""
    have = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join(have + [t for t in MALLOC_TUNABLES.split(":") if t not in have])}


def pause(seconds: float) -> float:
    """Sleep `seconds` (nothing when 0); returns the CPU time this process burned meanwhile (threads of the
    step before still spinning)."""
    if seconds <= 0:
        return 0.0
    c = time.process_time()
    time.sleep(seconds)
    return time.process_time() - c
