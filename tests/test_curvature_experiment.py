"""experiments.curvature on a tiny real sinusoid run (the batch meta-objective against a dense float64
meta-Hessian) and a tiny real Omniglot run (needs MAML_SHARED_DATA; a task's support loss against a
dense float64 Hessian), wandb logging, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from test_curvature import _f64, _jit

_RUNS: dict = {}


def _omniglot_run(shared_data: Path, tmp_path_factory) -> Path:
    """A tiny real experiments.omniglot run (Conv4 with 8 filters, 4 meta-iterations), made once."""
    if "omniglot" not in _RUNS:
        from experiments import omniglot

        out = tmp_path_factory.mktemp("curvature_omniglot") / "run"
        argv = ["--data-dir", str(shared_data / "omniglot"),
                "--cache-dir", str(tmp_path_factory.getbasetemp() / "omniglot_tfds"),  # shared with other tests
                "--filters", "8", "--meta-batch", "2", "--queries", "5", "--iterations", "4", "--steps-per-call", "2",
                "--val-every", "4", "--val-tasks", "2", "--eval-tasks", "2", "--no-progress", "--wandb", "disabled",
                "--out", str(out)]
        omniglot.main(argv)
        _RUNS["omniglot"] = out
    return _RUNS["omniglot"]


# Small settings: 2 tasks; Lanczos long enough for the top eigenvalue to converge. The batch-mean
# meta-objective and the SLQ densities (together two thirds of the Conv4 compile time) are checked on the
# sinusoid run instead: the Conv4-specific part is the per-task HVP program checked here.
_SMALL = ["--tasks", "2", "--k", "2", "--num-iters", "24", "--trace-hvps", "6", "--density-tasks", "0",
          "--no-batch-meta"]


def _curvature_run(shared_data, tmp_path_factory, wandb: str = "disabled") -> tuple[Path, Path, dict]:
    from experiments import curvature

    key = f"curvature-{wandb}"
    if key not in _RUNS:
        run = _omniglot_run(shared_data, tmp_path_factory)
        out = tmp_path_factory.mktemp("curvature_out") / wandb
        _RUNS[key] = (run, out, curvature.main(["--checkpoint", str(run), "--out", str(out), *_SMALL, "--wandb", wandb]))
    return _RUNS[key]


def test_curvature_experiment_on_a_sinusoid_run_matches_the_dense_batch_meta_hessian(tmp_path):
    """The batch-mean meta-objective's top eigenvalues and trace against `jax.hessian` of the mean
    meta-loss (through the run's inner step) over the same tasks, in float64; the SLQ densities and plot."""
    from experiments import curvature, sinusoid

    run = tmp_path / "run"
    sinusoid.main(["--iterations", "20", "--steps-per-call", "10", "--checkpoint-every", "20", "--hidden", "8,8",
                   "--baseline-iterations", "10", "--eval-tasks", "4", "--eval-points", "4", "--eval-steps", "0,1",
                   "--no-progress", "--wandb", "disabled", "--out", str(run)])
    saved = curvature.main(["--checkpoint", str(run), "--out", str(tmp_path / "c"), "--tasks", "3", "--k", "2",
                            "--num-iters", "40", "--trace-hvps", "60", "--density-tasks", "1", "--probes", "2",
                            "--slq-iters", "10", "--wandb", "disabled"])
    batch = saved["batch_meta_objective"]
    loaded = curvature.load(run, None)
    tasks = loaded.sample(jax.random.split(jax.random.PRNGKey(1234), 4)[0], 3)  # as curvature.main draws them
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        import maml

        arrays, static = eqx.partition(_f64(loaded.model), eqx.is_inexact_array)
        x, unravel = ravel_pytree(arrays)
        tasks64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tasks)
        mean_meta = lambda u: jnp.mean(jax.vmap(lambda t: maml.meta_loss(eqx.combine(unravel(u), static), t,
                                                                          loaded.inner))(tasks64))
        w = np.linalg.eigvalsh(np.asarray(_jit(jax.hessian(mean_meta))(x)))
    finally:
        jax.config.update("jax_enable_x64", old)
    assert x.size == saved["num_params"] == 97
    assert (tmp_path / "c" / "density.png").stat().st_size > 0 and saved["density"]["tasks"] == 1
    for name in ("support_mean", "meta_mean"):
        assert abs(np.trapezoid(saved["density"][name], saved["density"]["grid"]) - 1.0) < 0.05, name
    for part in ("support", "meta"):
        assert 0.0 <= saved[part]["negative_mass"]["min"] <= saved[part]["negative_mass"]["max"] <= 1.0
    top = np.asarray(batch["top_k"])
    assert np.allclose(top, w[::-1][:2], rtol=2e-3, atol=1e-4 * abs(w).max()), (top, w[-2:])
    assert abs(batch["trace"] - w.sum()) <= 4 * batch["trace_stderr"] + 0.05 * np.abs(w).sum(), (batch, w.sum())


@pytest.mark.slow  # minutes: compiling the Conv4's HVP programs
def test_curvature_experiment_on_an_omniglot_run(shared_data, tmp_path_factory):
    from experiments import curvature
    from maml.nn import cross_entropy

    run, out, results = _curvature_run(shared_data, tmp_path_factory)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and not (out / "density.png").exists()  # --density-tasks 0
    assert saved["run_type"] == "omniglot" and saved["checkpoint_step"] == 4 and saved["num_tasks"] == 2
    assert saved["episodes"]["test_alphabets"] == ["Korean", "Tagalog"] and saved["episodes"]["split"] == "meta-test"
    assert (saved["episodes"]["ways"], saved["episodes"]["shots"], saved["episodes"]["queries"]) == (5, 1, 5)
    assert saved["inner_steps"] == 1 and saved["inner_lr"] == 0.4
    for part in ("support", "meta"):
        assert "negative_mass" not in saved[part]
        for field in ("loss", "top_k", "min", "trace"):
            assert np.all(np.isfinite(saved[part][field]["per_task"])), (part, field)
        top = np.asarray(saved[part]["top_k"]["per_task"])
        assert top.shape == (2, 2) and np.all(top[:, 0] >= top[:, 1])
        assert np.all(top[:, 0] > np.asarray(saved[part]["min"]["per_task"]))
    assert np.allclose(saved["inner_stability"]["per_task"], 0.4 * np.asarray(saved["support"]["top_k"]["per_task"])[:, 0])
    assert "batch_meta_objective" not in saved and "density" not in saved  # --no-batch-meta, --density-tasks 0

    # Task 0's support-loss Hessian, dense in float64 (jax.hessian on the flat parameters of the checkpoint).
    loaded = curvature.load(run, None)
    key_tasks = jax.random.split(jax.random.PRNGKey(1234), 4)[0]  # as curvature.main draws its tasks
    task = jax.tree.map(lambda a: np.asarray(a[0]), loaded.sample(key_tasks, 2))
    assert np.isclose(float(cross_entropy(loaded.model, task.support_x, task.support_y)),
                      saved["support"]["loss"]["per_task"][0], rtol=1e-5)
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        model = _f64(loaded.model)
        arrays, static = eqx.partition(model, eqx.is_inexact_array)
        x, unravel = ravel_pytree(arrays)
        assert x.size == saved["num_params"] < 2500
        loss = lambda u: cross_entropy(eqx.combine(unravel(u), static), jnp.asarray(task.support_x, jnp.float64),
                                       jnp.asarray(task.support_y))
        w = np.linalg.eigvalsh(np.asarray(_jit(jax.hessian(loss))(x)))
    finally:
        jax.config.update("jax_enable_x64", old)
    got, bound = saved["support"]["top_k"]["per_task"][0], saved["support"]["ritz_residual_max"]
    assert abs(got[0] - w[-1]) <= bound + 1e-3 * abs(w[-1]), (got, w[-2:], bound)
    assert abs(got[0] - w[-1]) < 0.02 * abs(w[-1]), (got, w[-2:])
    assert saved["support"]["min"]["per_task"][0] >= w[0] - 1e-3 * np.abs(w).max()  # a Ritz value: inside the spectrum


@pytest.mark.slow  # minutes: compiling the Conv4's HVP programs
def test_curvature_experiment_logs_to_wandb_offline(shared_data, tmp_path_factory, monkeypatch, tmp_path):
    from launch.offline_runs import find_offline_runs, read_offline_run
    from test_logging import isolate_wandb

    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    _, out, results = _curvature_run(shared_data, tmp_path_factory, wandb="offline")
    (run_dir,) = find_offline_runs(out / "wandb")
    logged = read_offline_run(run_dir, wait=30)
    assert logged.exit_code == 0 and logged.job_type == "curvature"
    assert logged.config["wandb"] == "offline" and logged.config["tasks"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert {k: logged.summary[k] for k in saved} == saved == json.loads(json.dumps(results))
    assert not any(f.startswith("media/images/spectral_density_") for f in logged.files)  # --density-tasks 0


def test_curvature_experiment_bad_omniglot_inputs_are_one_line(shared_data, tmp_path_factory, tmp_path, capsys):
    from experiments import cli, curvature

    run = _omniglot_run(shared_data, tmp_path_factory)
    saved = json.loads((run / "config.json").read_text())
    capsys.readouterr()  # the run's own output, when this test made it

    def error(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(curvature.main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    def variant(name, **changes) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**saved, **changes}))
        return str(tmp_path / name)

    out = ["--out", str(tmp_path / "c"), "--wandb", "disabled"]
    missing = str(tmp_path / "nowhere")
    assert error(["--checkpoint", str(run), "--data-dir", missing, *out]) == \
        f"error: --data-dir {missing!r} is not a folder; expected the folder holding the Omniglot zips"
    moved = variant("moved", data_dir=missing)
    assert error(["--checkpoint", moved, *out]) == (
        f"error: --checkpoint {moved!r}: the run's data_dir {missing!r} is not a folder; pass --data-dir DIR "
        "(the folder holding the Omniglot zips)")
    reptile = variant("reptile", algorithm="reptile")
    assert error(["--checkpoint", reptile, *out]) == (
        f"error: --checkpoint {reptile!r} is a run of --algorithm reptile; the curvature diagnostics support "
        "maml and fomaml runs only")
    assert not (tmp_path / "c").exists()
