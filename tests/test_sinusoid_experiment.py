"""The main job, run for real with small budgets: outputs, resume, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from experiments import sinusoid

SMALL = ["--iterations", "200", "--steps-per-call", "50", "--checkpoint-every", "100", "--baseline-iterations",
         "100", "--eval-tasks", "50", "--eval-points", "20", "--hidden", "16,16", "--no-progress"]


def run(tmp_path, name, *extra):
    return sinusoid.main([*SMALL, "--out", str(tmp_path / name), *extra])


@pytest.mark.slow
def test_outputs_and_resume_reproduce_an_uninterrupted_run(tmp_path):
    straight = run(tmp_path, "a")
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(saved["mse"]) == {"0", "1", "5", "10"} == set(saved["baseline_mse"])
    assert saved["meta_iterations"] == 200 and saved["train_seconds"] > 0
    assert saved["mse"]["10"] < saved["mse"]["0"]  # adaptation helps even after a short run
    assert (tmp_path / "a" / "fits.png").stat().st_size > 10_000
    assert saved["params_sha256"] == straight["params_sha256"]
    # An interrupted run: it stopped at 100 iterations (its checkpoint is on disk); the same command resumes.
    run(tmp_path, "b", "--iterations", "100")
    resumed = run(tmp_path, "b")
    assert resumed["params_sha256"] == straight["params_sha256"]
    # Re-running a finished run changes nothing.
    assert run(tmp_path, "a")["params_sha256"] == straight["params_sha256"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.sinusoid", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, match", [
    (["--no-such-field", "3"], "unknown config field(s): --no-such-field 3"),
    (["--inner-lr", "0"], "--inner-lr=0.0; expected a positive number"),
    (["--inner-lr", "-0.1"], "--inner-lr=-0.1; expected a positive number"),
    (["--inner-steps", "0"], "--inner-steps=0; expected an integer >= 1"),
    (["--iterations", "-5"], "--iterations=-5; expected a positive number"),
    (["--shots", "five"], "--shots='five'; expected int"),
])
def test_bad_input_is_one_line(args, match):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {match}" if match.startswith("-") else result.stderr.strip()]
    assert match in result.stderr


def test_out_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    result = cli("--out", str(target))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --out {str(target)!r} is a file; expected a directory (existing or to be created)"


def test_resume_with_another_config_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"shots": 5}))
    result = cli("--out", str(tmp_path / "run"), "--shots", "10")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds a run with another config" in result.stderr and "shots" in result.stderr


def test_help_lists_every_config_field_grouped():
    result = cli("--help")
    assert result.returncode == 0
    from experiments import config_tree

    flags = config_tree.all_leaves(sinusoid.SinusoidConfig, sinusoid.algorithms)
    assert len(flags) > 40
    for leaf in flags.values():
        assert leaf.flag in result.stdout
    for group in ("tasks:", "training:", "evaluation:", "runtime:", "tracking:", "algorithm:",
                  "--algorithm reptile:", "--algorithm imaml:", "--algorithm mamlpp:"):
        assert f"\n{group}" in result.stdout, group
