"""experiments.omniglot and experiments.lake_oneshot end to end on the real minimal Omniglot zips: a short
training run beats chance on held-out alphabets, resume reproduces the parameters bit for bit, Lake's runs
(fixtures written here in the original layout) are classified, and bad input is one line each.

XLA compilations are cached on disk for this module (every run compiles the same programs), which keeps
the repeated runs cheap on busy CPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml
from data.omniglot import load_omniglot
from data.omniglot_files import ZIPS
from experiments import algorithms, cli, config_tree, evaluation, lake_oneshot, omniglot, runs, sinusoid

REPO = Path(__file__).resolve().parents[1]

# 5-way 1-shot, second order, a small Conv4: every run here has the same shapes, so each program compiles
# once for the module (the XLA cache below) and the slow test trains the same setup for longer.
SMALL = ["--filters", "16", "--meta-batch", "4", "--queries", "5", "--steps-per-call", "10", "--val-tasks", "100",
         "--no-progress"]
TINY = [*SMALL, "--val-every", "10", "--eval-tasks", "100"]
# Smaller still, for runs that each compile their own programs (devices, algorithms): a few meta-iterations.
MINI = ["--filters", "4", "--meta-batch", "4", "--queries", "2", "--steps-per-call", "3", "--val-every", "3",
        "--val-tasks", "2", "--eval-tasks", "2", "--eval-steps", "1", "--no-progress", "--wandb", "disabled"]
RTOL, ATOL = 1e-5, 1e-6  # as tests/test_parallel.py: float32 round-off, the mean over tasks summed in another order


@pytest.fixture(scope="module")
def omniglot_dir() -> Path:
    path = Path(os.environ.get("MAML_SHARED_DATA", "/nonexistent")) / "omniglot"
    if not all((path / ZIPS[s].filename).is_file() for s in ("small1", "small2")):
        pytest.skip(f"real data not available: set MAML_SHARED_DATA to ../shared/data (no minimal zips in {path})")
    return path


@pytest.fixture(scope="module")
def data_args(omniglot_dir, tmp_path_factory) -> list[str]:
    """--data-dir and the session's tfds cache (shared with tests/test_omniglot_data.py), built here so that
    tfds' progress output on a first build never lands in a test's captured stderr."""
    cache = tmp_path_factory.getbasetemp() / "omniglot_tfds"
    load_omniglot(omniglot_dir, cache)
    return ["--data-dir", str(omniglot_dir), "--cache-dir", str(cache)]


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
    return out, omniglot.main([*data_args, *TINY, "--iterations", "20", "--wandb", "disabled", "--out", str(out)])


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
    half = omniglot.main([*data_args, *TINY, "--iterations", "10", "--wandb", "disabled", "--out", str(resumed)])
    assert half["params_sha256"] != results["params_sha256"]
    full = omniglot.main([*data_args, *TINY, "--iterations", "20", "--wandb", "disabled", "--out", str(resumed)])
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
    (other / "config.json").write_text(json.dumps(config_tree.to_flat(cli.parse(sinusoid.CONFIG, [], sinusoid.algorithms))))
    err = one_line_error(capsys, lake_oneshot, ["--runs", str(tmp_path), "--checkpoint", str(other)])
    assert "is an experiments.sinusoid run; expected an experiments.omniglot output folder" in err
    err = one_line_error(capsys, lake_oneshot, ["--runs", str(tmp_path), "--checkpoint", str(tmp_path / "none")])
    assert "has no config.json" in err


def test_out_folder_of_another_experiment_is_one_line(data_args, tmp_path, capsys):
    other = tmp_path / "sinusoid_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config_tree.to_flat(cli.parse(sinusoid.CONFIG, [], sinusoid.algorithms))))
    err = one_line_error(capsys, omniglot, [*data_args, "--out", str(other)])
    assert "holds a run with another config" in err


@pytest.mark.slow
def test_short_training_beats_chance_on_held_out_alphabets(data_args, lake_dir, tmp_path):
    """5-way 1-shot, second-order MAML, a small Conv4 for 150 iterations: far above 20% on Korean and
    Tagalog (never seen in training); its 5-way model on 20-way Lake-style runs (zero head) beats 95% error."""
    out = tmp_path / "run"
    results = omniglot.main([*data_args, *SMALL, "--iterations", "150", "--val-every", "50", "--eval-tasks", "600",
                             "--wandb", "disabled", "--out", str(out)])
    assert results["test_tasks"] == 600
    assert results["test_accuracy"] - results["test_accuracy_ci95"] > 0.5, results
    lake = lake_oneshot.main(["--runs", str(lake_dir), "--checkpoint", str(out), "--out", str(tmp_path / "lake")])
    assert lake["head"].startswith("zero") and lake["error_rate"] < 0.9, lake


def final_params(run_dir: Path) -> list[np.ndarray]:
    """The array leaves of the model in `run_dir`'s newest checkpoint (and of the untrained model)."""
    run = runs.load(run_dir)
    leaves = lambda m: [np.asarray(a) for a in jax.tree.leaves(eqx.filter(m, eqx.is_array))]
    return leaves(run.state.model), leaves(run.setup.state.model)


# Both runs in one subprocess with 2 fake CPU devices (as tests/test_parallel.py), so the same XLA flags
# compile both; optimisation level 0 halves the compile time.
TWO_RUNS = """
import sys
from experiments import omniglot
argv, out = sys.argv[1:-1], sys.argv[-1]
for n in (1, 2):
    omniglot.main([*argv, "--devices", str(n), "--out", f"{out}/devices{n}"])
"""


def test_two_devices_match_one_device(data_args, tmp_path):
    """--devices 2 (the sharded step: each device draws and maps its half of the batch, by default with
    `Map` on CPU)
    ends with the parameters of --devices 1 up to float32 round-off."""
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", TWO_RUNS, *data_args, *MINI, "--iterations", "3", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"devices{n}" / "results.json").read_text()) for n in (1, 2))
    assert one["meta_iterations"] == two["meta_iterations"] == 3
    assert one["config"]["devices"] == 1 and two["config"]["devices"] == 2 and one["config"]["batching"] is None
    assert one["batching"] == two["batching"] == "Map()"
    (a, init), (b, _) = final_params(tmp_path / "devices1"), final_params(tmp_path / "devices2")
    assert len(a) == len(b) == len(init)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=f"--devices 2 vs 1: leaf {i}")
    assert any(not np.array_equal(x, x0) for x, x0 in zip(a, init))  # training moved the parameters


def test_meta_batch_must_divide_across_devices(data_args, tmp_path):
    """One line before anything is written (2 fake devices, a meta-batch of 3)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "experiments.omniglot", *data_args, *MINI, "--meta-batch", "3",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --meta-batch=3 does not divide evenly across 2 devices (2 per process x 1 processes); "
        "change --meta-batch or --devices"]
    assert not out.exists()


def config_of(*argv: str) -> omniglot.OmniglotConfig:
    return cli.parse(omniglot.OmniglotConfig, ["--data-dir", "unused", *argv], omniglot.algorithms)


def test_algorithm_flags_build_their_pieces():
    build = lambda *argv: omniglot.setup(config_of("--filters", "4", *argv)).algo
    assert isinstance(build().strategy, maml.SecondOrder) and isinstance(build().model, maml.nn.Conv4)
    assert isinstance(build("--first-order").strategy, maml.FirstOrder)  # --first-order: FOMAML, as before
    assert isinstance(build("--algorithm", "fomaml").strategy, maml.FirstOrder)
    anil = build("--algorithm", "anil")
    assert eqx.tree_equal(anil.inner.adapt_filter, maml.head_filter(anil.model))
    assert isinstance(build("--algorithm", "metasgd").model, maml.LearnedLR)
    pp = build("--algorithm", "mamlpp", "--mamlpp-per-step-bn", "--inner-steps", "2")
    assert isinstance(pp.model, maml.LearnedLR) and isinstance(pp.model.model, maml.nn.PerStep)
    assert pp.model.model.steps == 2 and isinstance(pp.strategy, maml.MultiStepLoss)
    assert isinstance(build("--algorithm", "mamlpp").model.model, maml.nn.PerStep)  # the release's default
    assert isinstance(build("--algorithm", "mamlpp", "--no-mamlpp-per-step-bn").model.model, maml.nn.Conv4)
    assert isinstance(build("--algorithm", "reptile").strategy, maml.Reptile)
    assert isinstance(build("--algorithm", "imaml").strategy, maml.Implicit)
    with pytest.raises(ValueError, match="--first-order is an option of --algorithm maml / anil / metasgd / "
                                         "mamlpp, not of --algorithm reptile; drop the flag"):
        build("--algorithm", "reptile", "--first-order")
    with pytest.raises(ValueError, match="--algorithm='mamlxx'; expected one of maml, fomaml"):
        config_of("--algorithm", "mamlxx")
    assert {"devices", "wandb", "algorithm", "first_order"} <= set(config_tree.to_flat(config_of()))
    assert "mamlpp_per_step_bn" in config_tree.to_flat(config_of("--algorithm", "mamlpp"))
    assert set(algorithms.NAMES) == {"maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml"}
    resumable = {leaf.key for leaf, _ in config_tree.flat_leaves(config_of()) if leaf.resumable}
    for name in ("devices", "coordinator", "num_processes", "process_id", "wandb", "wandb_project", "wandb_dir"):
        assert name in resumable


def test_evaluation_adapts_with_learned_rates():
    """Meta-SGD's rates, not --inner-lr, drive validation and test adaptation: with every rate 0 the
    accuracy after adaptation is the accuracy before it."""
    config = config_of("--filters", "4", "--algorithm", "metasgd", "--queries", "3", "--eval-steps", "2")
    algo, _, _ = omniglot.setup(config)
    images = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (12, 20, 28, 28), 0, 256), np.uint8)
    key = jax.random.PRNGKey(2)
    frozen = eqx.tree_at(lambda m: m.lr, algo.model, jax.tree.map(jnp.zeros_like, algo.model.lr))
    episodes, steps = config.data.episodes, config.algorithm.eval_steps
    after = evaluation.evaluate_episodes(frozen, images, episodes, key, 4, algo.inner, algo.evaluation, steps).metric
    tasks = evaluation.draw(episodes.sampler(images, 4), jax.random.fold_in(key, 0))
    before = eqx.filter_jit(lambda m, ts: jax.vmap(lambda t: maml.nn.accuracy(m, t.query_x, t.query_y))(ts))(
        frozen.model, tasks)
    np.testing.assert_array_equal(after[:, 0], np.asarray(before))
    plain = evaluation.evaluate_episodes(frozen.model, images, episodes, key, 4, maml.InnerLoop(
        maml.nn.cross_entropy, 2, 5.0), maml.SecondOrder(), steps).metric  # a plain loop with a big step changes them
    assert not np.array_equal(plain, after)
