"""The benchmark scripts run end to end. benchmarks.gpu, the accelerator benchmark, at tiny sizes on the CPU, so
that the device time of a GPU machine is spent on a script known to work. With the bench extra (PyTorch, higher, learn2learn) every
peer's float32 meta-gradient is checked and timed too; without it, ours alone and the peers reported as not
installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import compare, gpu, machine, peers, profile_step
from benchmarks.workloads import WORKLOADS


def run(tmp_path, *argv) -> tuple[dict, dict]:
    out = tmp_path / "gpu.json"
    result = gpu.main(["--small", "--budget-s", "1", "--min-rounds", "2", "--out", str(out), *argv])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # strict JSON, as returned
    info = result["machine"]
    assert info["precision"] == "highest" and info["f32_matmul_gflop_per_s"] > 0 and info["jax_backend"] == "cpu"
    return info, {(r["workload"], r["impl"]): r for r in result["rows"]}


def check_row(workload: str, impl: str, r: dict) -> None:
    if "note" in r:  # a peer not installed or not of this form, or a convolution variant on the MLP
        assert impl != "ours-vmap" and (impl in peers.PEERS or WORKLOADS[workload].model == "mlp"), r
        return
    assert r["rounds"] >= 2 and math.isfinite(r["tasks_per_s"]) and r["tasks_per_s"] > 0, r
    assert r["peak_mem_mb"] >= 0
    if impl in gpu.OURS:
        assert 0 < r["share_of_f32_matmul"] < 1 and r["gflop_per_iter"] > 0, r
    else:  # a timed peer passed its float32 gradient check on the same parameters and data
        assert r["grad_rel_err"] < 1e-4, r


def test_every_workload_with_every_peer(tmp_path, capsys):
    impls = ["ours-vmap", *peers.PEERS]
    _, by = run(tmp_path, "--impls", ",".join(impls))
    assert set(by) == {(w, i) for w in WORKLOADS for i in impls}, "every workload x impl has a row or a note"
    for (w, impl), r in by.items():
        check_row(w, impl, r)
    table = capsys.readouterr().out
    assert "miniimagenet-5w1s-5step" in table and "f32 share" in table and "wrote " in table


def test_every_form_of_ours(tmp_path):
    """Ours with Map and with LaxConv (the same step, other values) on one workload."""
    _, by = run(tmp_path, "--workloads", "omniglot-5w1s-1st", "--impls", ",".join(gpu.OURS))
    assert set(by) == {("omniglot-5w1s-1st", i) for i in gpu.OURS}
    for (w, impl), r in by.items():
        assert "note" not in r
        check_row(w, impl, r)


@pytest.mark.parametrize("main, argv, match", [
    (gpu.main, ["--workloads", "imagenet"], "--workloads: 'imagenet'; expected names from"),
    (gpu.main, ["--impls", "torch"], "--impls: 'torch'; expected names from"),
    (gpu.main, ["--budget-s", "0"], "--budget-s 0.0 and --min-rounds 3: expected positive values"),
    (compare.main, ["--settle", "0,half"], "--settle: '0,half'; expected comma-separated seconds"),
    (compare.main, ["--settle", "-1"], "--settle: '-1'; expected pauses of 0 to 60 seconds"),
    (compare.main, ["--impls", "torch"], "--impls: 'torch'; expected names from"),
])
def test_bad_flags_are_one_line_errors(capsys, main, argv, match):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in err, err


def test_compare_times_each_implementation_at_its_fastest_pause(capsys):
    """benchmarks.compare as run, on the sinusoid: each pause is a protocol of its own rounds, every row reports
    them all and its fastest; peers that do not import are notes."""
    compare.main(["--workloads", "sinusoid", "--repeats", "2", "--settle", "0,0.01", "--json"])
    rows = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(compare.IMPLS)
    ours = rows["ours"]
    assert set(ours["tasks_per_s_by_settle"]) == {"0.0", "0.01"} and set(ours["cpu_s_in_pause_after"]) == {"0.01"}
    assert ours["tasks_per_s"] == max(ours["tasks_per_s_by_settle"].values())
    assert ours["tasks_per_s_by_settle"][str(ours["settle_s"])] == ours["tasks_per_s"]
    assert ours["cpu_s_in_pause_after"]["0.01"] >= 0 and ours["gflop_per_iter"] > 0
    assert 0 <= ours["steal_fraction"] <= 1 or (math.isnan(ours["steal_fraction"]) and compare.cpu_times() == (0, 0))
    # ours' memory: the larger of XLA's count plus oneDNN's buffers (none for an MLP) and a compiled step's
    # resident-set growth
    assert ours["onednn_buffers_mb"] == 0
    assert ours["peak_mem_mb"] == max(ours["xla_peak_mb"], ours["rss_growth_mb"]) and ours["xla_peak_mb"] > 0
    assert ours["minor_faults_per_iter"] >= 0 and ours["malloc_tuned"] == machine.malloc_tuned()
    for name in peers.PEERS:
        assert "note" in rows[name] or rows[name]["tasks_per_s"] > 0, rows[name]


def test_compare_table_without_peers_says_so(capsys):
    """Ours alone (e.g. against its earlier convolution forms): the ratio columns say there is no peer."""
    compare.main(["--workloads", "sinusoid", "--impls", "ours", "--repeats", "1", "--settle", "0"])
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sinusoid ")]
    assert row.count("no peer") == 2 and "nan" not in row, row


def _untuned_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, "PYTHONPATH": os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])}


def test_compare_from_the_command_line_restarts_under_the_malloc_tunables():
    argv = [sys.executable, "-m", "benchmarks.compare", "--workloads", "sinusoid", "--impls", "ours", "--repeats", "1",
            "--settle", "0", "--json"]
    for extra, tuned in (([], True), (["--malloc", "default"], False)):
        out = subprocess.run(argv + extra, env=_untuned_env(), capture_output=True, text=True, check=True).stdout
        (row,) = map(json.loads, out.splitlines())
        assert row["impl"] == "ours" and row["malloc_tuned"] is tuned, (extra, row)


def test_malloc_tunables_keep_freed_large_blocks_for_reuse():
    """What the tunables are for: three 16 MB blocks allocated, written and freed together 20 times fault their
    pages in at most once with them; glibc's defaults give the heap's top back to the kernel after each round
    (as after PyTorch's operations), and the pages fault in again and again (measured: 30,556 against 1,558)."""
    script = textwrap.dedent("""
        import resource, numpy as np
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            a = np.empty(1 << 22, np.float32); a[:] = 1.0
            b = np.empty(1 << 22, np.float32); b[:] = 1.0
            c = np.empty(1 << 22, np.float32); c[:] = 1.0
            del a, b, c
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    pages = (1 << 24) // os.sysconf("SC_PAGE_SIZE")  # of one block

    def faults(env):
        return int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    untuned = _untuned_env()
    assert faults(machine.with_malloc_tunables(untuned)) < 3 * pages
    assert faults(untuned) > 5 * pages


def test_with_malloc_tunables_keeps_other_tunables():
    env = machine.with_malloc_tunables({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "HOME": "/x"})
    assert env["HOME"] == "/x" and env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + machine.MALLOC_TUNABLES
    assert machine.malloc_tuned(env) and machine.with_malloc_tunables(env) == env
    assert not machine.malloc_tuned({}) and not machine.malloc_tuned({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})


def test_steal_fraction():
    assert compare.steal_fraction((10, 100), (30, 300)) == 0.1
    assert math.isnan(compare.steal_fraction((0, 0), (0, 0)))


def test_compare_times_ours_against_its_earlier_defaults(monkeypatch, capsys):
    """`--impls ours,ours-winograd,ours-im2col,higher` on a tiny Conv4: ours at its earlier default convolutions
    is timed beside the default and never counted as a peer; our timed float32 meta-gradient is checked."""
    monkeypatch.setitem(compare.WORKLOADS, "tiny", gpu.small(WORKLOADS["omniglot-5w1s-1st"]))
    compare.main(["--workloads", "tiny", "--impls", "ours,ours-winograd,ours-im2col,higher", "--repeats", "2",
                  "--settle", "0", "--json"])
    rows = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    higher = rows["higher"].get("tasks_per_s")
    for name in ("ours", "ours-winograd", "ours-im2col"):
        r = rows[name]
        assert r["tasks_per_s"] > 0 and r["peak_mem_mb"] == max(r["xla_peak_mb"], r["rss_growth_mb"]), r
        if higher is None:  # no peer: no ratio
            assert math.isnan(r["ratio_to_fastest_peer"]), r
        else:
            assert math.isclose(r["ratio_to_fastest_peer"], r["tasks_per_s"] / higher), r


def test_profile_of_the_step_names_its_operations(capsys):
    profile_step.main(["--workload", "sinusoid", "--meta-batch", "2", "--steps", "1", "--top", "5"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sinusoid, meta-batch 2: ") and "by kind:" in out
    top = out[1:out.index("by kind:")]
    assert len(top) == 5 and all(" ms " in line for line in top)
    assert any("dot" in line for line in out), "the MLP's matmuls are among its operations"
