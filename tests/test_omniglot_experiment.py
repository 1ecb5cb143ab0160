"""experiments.omniglot and experiments.lake_oneshot end to end on the real minimal Omniglot zips: a short
training run beats chance on held-out alphabets, resume reproduces the parameters bit for bit, Lake's runs
(fixtures written here in the original layout) are classified, and bad input is one line each.

XLA compilations are cached on disk for this module (every run compiles the same programs), which keeps
the repeated runs cheap on busy CPUs.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from data.omniglot import ZIPS
from experiments import cli, lake_oneshot, omniglot
from experiments.sinusoid import SinusoidConfig

# 5-way 1-shot, second order, a small Conv4: every run here has the same shapes, so each program compiles
# once for the module (the XLA cache below) and the slow test trains the same setup for longer.
SMALL = ["--filters", "16", "--meta-batch", "4", "--queries", "5", "--steps-per-call", "10", "--val-tasks", "100",
         "--no-progress"]
TINY = [*SMALL, "--val-every", "10", "--eval-tasks", "100"]


@pytest.fixture(scope="module")
def omniglot_dir() -> Path:
    path = Path(os.environ.get("MAML_SHARED_DATA", "/nonexistent")) / "omniglot"
    if not all((path / ZIPS[s].filename).is_file() for s in ("small1", "small2")):
        pytest.skip(f"real data not available: set MAML_SHARED_DATA to ../shared/data (no minimal zips in {path})")
    return path


@pytest.fixture(scope="module")
def data_args(omniglot_dir, tmp_path_factory) -> list[str]:
    """--data-dir and the session's tfds cache (shared with tests/test_omniglot_data.py)."""
    return ["--data-dir", str(omniglot_dir), "--cache-dir", str(tmp_path_factory.getbasetemp() / "omniglot_tfds")]


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = [getattr(jax.config, n) for n in names]
    jax.config.update(names[0], str(tmp_path_factory.getbasetemp() / "xla_cache"))
    jax.config.update(names[1], 0.0)
    yield
    for n, v in zip(names, old):
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def tiny_run(data_args, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "run"
    return out, omniglot.main([*data_args, *TINY, "--iterations", "20", "--out", str(out)])


def write_lake_runs(root: Path, omniglot_dir: Path, runs: int = 20, ways: int = 20, seed: int = 0) -> np.ndarray:
    """Lake's layout under `root`, from real Korean characters (a held-out alphabet), 2 drawers each:
    run r's class j is drawer a of a character, its test items drawer b of the same characters, shuffled.
    Returns the correct class of each test item `[runs, ways]`."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(omniglot_dir / ZIPS["small1"].filename) as archive:
        by_char: dict[str, list[str]] = {}
        for name in archive.namelist():
            if name.endswith(".png") and "/Korean/" in name:
                by_char.setdefault(name.rsplit("/", 1)[0], []).append(name)
        labels = np.zeros((runs, ways), np.int32)
        for r in range(runs):
            run = f"run{r + 1:02d}"
            (root / run / "training").mkdir(parents=True)
            (root / run / "test").mkdir()
            chars = rng.choice(sorted(by_char), ways, replace=False)
            drawers = [rng.choice(sorted(by_char[c]), 2, replace=False) for c in chars]
            order = rng.permutation(ways)  # test item i shows class order[i]
            lines = []
            for i in range(ways):
                (root / run / "training" / f"class{i + 1:02d}.png").write_bytes(archive.read(drawers[i][0]))
                (root / run / "test" / f"item{i + 1:02d}.png").write_bytes(archive.read(drawers[order[i]][1]))
                lines.append(f"{run}/test/item{i + 1:02d}.png {run}/training/class{order[i] + 1:02d}.png")
            (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
            labels[r] = order
    return labels


@pytest.fixture(scope="module")
def lake_dir(omniglot_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lake") / "all_runs"
    write_lake_runs(root, omniglot_dir)
    return root


def one_line_error(capsys, module, argv) -> str:
    """Run `module.main` as the command line does; return its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_results_and_resume_gives_identical_params(tiny_run, data_args, tmp_path):
    out, results = tiny_run
    assert results["test_tasks"] == 100 and results["meta_iterations"] == 20
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_accuracy_ci95"] >= 0.0
    assert results["test_alphabets"] == ["Korean", "Tagalog"]
    assert results["characters"] == {"train": 185, "validation": 0, "test": 57}
    saved = json.loads((out / "results.json").read_text())
    assert saved["params_sha256"] == results["params_sha256"] and len(saved["params_sha256"]) == 64
    assert [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()] == [10, 20]

    resumed = tmp_path / "resumed"
    half = omniglot.main([*data_args, *TINY, "--iterations", "10", "--out", str(resumed)])
    assert half["params_sha256"] != results["params_sha256"]
    full = omniglot.main([*data_args, *TINY, "--iterations", "20", "--out", str(resumed)])
    assert full["meta_iterations"] == 20
    assert full["params_sha256"] == results["params_sha256"]


def test_lake_oneshot_on_fixture_runs(tiny_run, lake_dir, tmp_path):
    """The original shape (20 runs, 20-way) with a 5-way checkpoint: a zero 20-way head (auto)."""
    run_dir, _ = tiny_run
    results = lake_oneshot.main(["--runs", str(lake_dir), "--checkpoint", str(run_dir), "--out", str(tmp_path / "a")])
    assert 0.0 <= results["error_rate"] <= 1.0 and results["items"] == 400
    assert len(results["per_run_error"]) == 20 and all(0.0 <= e <= 1.0 for e in results["per_run_error"].values())
    assert results["head"].startswith("zero (20-way") and results["checkpoint_step"] == 20
    assert np.isclose(np.mean(list(results["per_run_error"].values())), results["error_rate"])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["error_rate"] == results["error_rate"]


def test_lake_trained_head_needs_as_many_ways(tiny_run, lake_dir, omniglot_dir, tmp_path, capsys):
    run_dir, _ = tiny_run
    err = one_line_error(capsys, lake_oneshot, ["--runs", str(lake_dir), "--checkpoint", str(run_dir),
                                                "--head", "trained", "--out", str(tmp_path / "a")])
    assert "the checkpoint is 5-way but the runs are 20-way; expected a 20-way checkpoint" in err
    five = tmp_path / "five_way"
    write_lake_runs(five, omniglot_dir, runs=2, ways=5)  # same layout, 5 classes a run: the head fits
    results = lake_oneshot.main(["--runs", str(five), "--checkpoint", str(run_dir), "--out", str(tmp_path / "b")])
    assert results["head"] == "trained (5-way)" and results["items"] == 10 and len(results["per_run_error"]) == 2


def test_data_folder_without_zips_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, omniglot, ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "holds none of images_background.zip" in err
    assert not (tmp_path / "out").exists()


def test_more_ways_than_classes_is_one_line(data_args, tmp_path, capsys):
    err = one_line_error(capsys, omniglot, [*data_args, "--ways", "1000", "--out", str(tmp_path / "a")])
    assert "meta-train alphabets" in err and "ways=1000 is more than the split's 740 classes" in err
    err = one_line_error(capsys, omniglot, [*data_args, "--ways", "300", "--out", str(tmp_path / "b")])
    assert "meta-test alphabets" in err and "ways=300 is more than the split's 228 classes" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_shots_plus_queries_above_20_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, omniglot, ["--data-dir", str(tmp_path), "--shots", "5", "--queries", "16"])
    assert "--shots + --queries = 5 + 16 = 21; expected at most the 20 images" in err


def test_checkpoint_of_another_experiment_is_one_line(tmp_path, capsys):
    other = tmp_path / "sinusoid_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cli.to_json(SinusoidConfig())))
    err = one_line_error(capsys, lake_oneshot, ["--runs", str(tmp_path), "--checkpoint", str(other)])
    assert "is not an experiments.omniglot run" in err
    err = one_line_error(capsys, lake_oneshot, ["--runs", str(tmp_path), "--checkpoint", str(tmp_path / "none")])
    assert "has no config.json" in err


def test_out_folder_of_another_experiment_is_one_line(data_args, tmp_path, capsys):
    other = tmp_path / "sinusoid_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cli.to_json(SinusoidConfig())))
    err = one_line_error(capsys, omniglot, [*data_args, "--out", str(other)])
    assert "holds a run with another config" in err


@pytest.mark.slow
def test_short_training_beats_chance_on_held_out_alphabets(data_args, lake_dir, tmp_path):
    """5-way 1-shot, second-order MAML, a small Conv4 for 150 iterations: far above 20% on Korean and
    Tagalog (never seen in training); its 5-way model on 20-way Lake-style runs (zero head) beats 95% error."""
    out = tmp_path / "run"
    results = omniglot.main([*data_args, *SMALL, "--iterations", "150", "--val-every", "50", "--eval-tasks", "600",
                             "--out", str(out)])
    assert results["test_tasks"] == 600
    assert results["test_accuracy"] - results["test_accuracy_ci95"] > 0.5, results
    lake = lake_oneshot.main(["--runs", str(lake_dir), "--checkpoint", str(out), "--out", str(tmp_path / "lake")])
    assert lake["head"].startswith("zero") and lake["error_rate"] < 0.9, lake
