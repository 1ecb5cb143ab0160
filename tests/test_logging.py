"""Loggers, the offline run reader, and an experiment logging to wandb offline / disabled."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

import maml
from experiments import tracking
from launch.offline_runs import find_offline_runs, read_offline_run
from maml import AbstractLogger, ConsoleLogger, MultiLogger, WandbLogger
from maml.training.loggers import chunk_scalars, flatten

REPO = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "200", "--steps-per-call", "100", "--baseline-iterations", "100", "--eval-tasks", "20",
        "--no-progress"]


def isolate_wandb(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """Keep wandb's caches and settings in `tmp` (run files go to each run's OUT, and the tests run in
    `tmp`); no API key, no sweep, offline by default."""
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp / "wandb-home" / name.lower()))
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_SWEEP_ID", "WANDB_RUN_ID",
                 "WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_GROUP", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp / "no-netrc"))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)


TOY = '''
"""A toy experiment for the tests: a short "training curve"; --lr above 0.5 crashes."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from experiments import cli, config, config_tree, tracking


@dataclass(frozen=True)
class ToyConfig:
    lr: float = config.flag(0.1, "learning rate")
    steps: int = config.flag(3, "steps")
    sleep: float = config.flag(0.0, "seconds per step")
    out: str = config.flag("runs/toy", "output folder")
    tracking: tracking.TrackingConfig = config.section(tracking.TrackingConfig)


CONFIG = ToyConfig


def main(argv=None):
    toy = tracking.prepare(cli.parse(ToyConfig, argv))
    with cli.run_folder(toy.out, toy) as out:
        logger = tracking.start(toy.tracking, config_tree.to_flat(toy), out, job="toy")
        if toy.lr > 0.5:
            raise RuntimeError("toy crash")
        for step in range(1, toy.steps + 1):
            logger.log_scalars(step, {"loss": 10 * (toy.lr - 0.3) ** 2 + 1.0 / step})
            time.sleep(toy.sleep)
        results = {"loss": 10 * (toy.lr - 0.3) ** 2 + 1.0 / toy.steps, "meta_iterations": toy.steps}
        (out / "results.json").write_text(json.dumps(results))
        tracking.finish(logger, results)


if __name__ == "__main__":
    cli.run(main)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    """`python -m toyexp` importable here and in the trials' subprocesses; wandb kept in tmp_path."""
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toyexp.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO}")
    return tmp_path


class Recorder(AbstractLogger):
    """Remembers every call, to compare with what the offline run file holds."""

    def __init__(self):
        self.config, self.scalars, self.images, self.summary, self.exit_code = {}, [], [], {}, None

    def log_config(self, config):
        self.config.update(config)

    def log_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def log_image(self, name, image, step=None):
        self.images.append((name, image, step))

    def log_summary(self, summary):
        self.summary.update(summary)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_flatten_and_chunk_scalars():
    assert flatten({"mse": {"1": 0.5, "5": 0.25}, "t": 3}) == {"mse/1": 0.5, "mse/5": 0.25, "t": 3}
    metrics = {"meta_loss": np.array([1.0, 3.0]), "lr": np.array([[1.0, 2.0], [3.0, 4.0]])}
    assert chunk_scalars(metrics) == {"train/meta_loss": 2.0, "train/lr/0": 2.0, "train/lr/1": 3.0}


def test_console_and_multi_logger():
    lines, rec = [], Recorder()
    logger = MultiLogger(ConsoleLogger(every=2, print_fn=lines.append), rec)
    hook = logger.hook(every=10)  # as maml.fit calls it, with the metrics since its last call
    assert isinstance(hook, maml.Hook) and hook.every == 10
    for step in (10, 20, 30):
        hook.fn(maml.StepInfo(step, None, {"meta_loss": np.array([float(step)])}, False))
    logger.log_summary({"a": 1})
    logger.finish()
    assert lines == ["step 20: train/meta_loss=20"]
    assert rec.scalars == [(10, {"train/meta_loss": 10.0}), (20, {"train/meta_loss": 20.0}),
                           (30, {"train/meta_loss": 30.0})]
    assert rec.summary == {"a": 1} and rec.exit_code == 0
    with pytest.raises(ValueError, match="every=0"):
        ConsoleLogger(every=0)


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.resolve_mode(None) == "offline"  # no key: never prompts
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(None) == "disabled"
    assert tracking.resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="--wandb='loud'; expected one of online, offline, disabled"):
        tracking.resolve_mode("loud")
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--wandb=online needs an API key"):
        tracking.resolve_mode("online")


def test_wandb_logger_offline_roundtrip(tmp_path):
    logger = WandbLogger(mode="offline", dir=tmp_path / "runs", project="p", group="g", job_type="unit",
                         config={"lr": 0.1, "hidden": [40, 40]})
    logger.log_config({"extra": "yes"})
    logged = [(step, {"train/loss": 1.0 / step, "train/acc": step / 10}) for step in (1, 2, 5)]
    for step, scalars in logged:
        logger.log_scalars(step, scalars)
    logger.log_image("fits", np.zeros((8, 8, 3), np.uint8), step=5)
    summary = {"mse": {"1": 0.5, "10": 0.125}, "note": "ok", "seconds": 1.5}
    logger.log_summary(summary)
    logger.finish()

    (run_dir,) = find_offline_runs(tmp_path / "runs", run_id=logger.run.id)
    run = read_offline_run(run_dir, wait=30)
    assert (run.run_id, run.project, run.group, run.job_type) == (logger.run.id, "p", "g", "unit")
    assert run.config == {"lr": 0.1, "hidden": [40, 40], "extra": "yes"}
    rows = [(r["_step"], {k: v for k, v in r.items() if k.startswith("train/")}) for r in run.history]
    assert [r for r in rows if r[1]] == logged
    assert run.scalars("train/loss") == [(1, 1.0), (2, 0.5), (5, 0.2)]
    assert any(f.startswith("media/images/fits_") for f in run.files)
    assert {k: run.summary[k] for k in summary} == summary
    assert run.exit_code == 0


def test_a_failing_run_is_finished_and_never_reused(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with WandbLogger(mode="offline", dir=tmp_path / "a", project="p") as failed:
            failed.log_scalars(1, {"loss": 1.0})
            raise RuntimeError("boom")
    assert read_offline_run(failed.run_dir, wait=30).exit_code == 1
    # wandb's default would hand an active run back to the next wandb.init; a logger owns its own run
    active = WandbLogger(mode="offline", dir="relative", project="p")  # resolved against the cwd now
    second = WandbLogger(mode="offline", dir=tmp_path / "b", project="p")
    assert active.run.id != second.run.id and second.run_dir.parent.parent == tmp_path / "b"
    assert active.run_dir.parent.parent == tmp_path / "relative"  # the autouse fixture's cwd
    second.finish()
    active.finish()
    active.finish()  # finishing twice is harmless
    assert read_offline_run(active.run_dir, wait=30).exit_code == 0


def test_reader_rejects_other_files(tmp_path):
    (tmp_path / "run-x.wandb").write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a wandb run file"):
        read_offline_run(tmp_path / "run-x.wandb")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no run-\\*.wandb file"):
        read_offline_run(tmp_path / "nothing")


@pytest.mark.slow
def test_sinusoid_offline_run_reads_back(tmp_path, monkeypatch):
    from experiments import sinusoid

    recorders = []
    start = tracking.start

    def recording_start(config, flat, out, **kwargs):
        recorders.append(Recorder())
        return MultiLogger(start(config, flat, out, **kwargs), recorders[-1])

    monkeypatch.setattr(tracking, "start", recording_start)

    def small_plot(path, *args, **kwargs):  # the real plot compiles ~80 XLA programs; not under test here
        from PIL import Image

        Image.new("RGB", (16, 8), "white").save(path)

    monkeypatch.setattr(sinusoid, "plot_fits", small_plot)
    out = tmp_path / "sin"
    results = sinusoid.main(TINY + ["--out", str(out), "--wandb", "offline", "--wandb-group", "tests"])
    (rec,) = recorders

    (run_dir,) = find_offline_runs(out / "wandb")
    run = read_offline_run(run_dir, wait=30)
    assert run.exit_code == 0 and run.group == "tests" and run.job_type == "sinusoid"
    assert run.config == json.loads((out / "config.json").read_text())
    assert run.config["iterations"] == 200 and run.config["wandb"] == "offline"
    curve = [(s, v) for s, v in rec.scalars if "train/meta_loss" in v]
    assert [s for s, _ in curve] == [100, 200]
    assert run.scalars("train/meta_loss") == [(s, v["train/meta_loss"]) for s, v in curve]
    for step, scalars in rec.scalars:  # every logged scalar is in the history at its step
        row = next(r for r in run.history if r["_step"] == step and set(scalars) <= set(flatten(r)))
        assert {k: flatten(row)[k] for k in scalars} == scalars
    saved = json.loads((out / "results.json").read_text())
    assert {k: run.summary[k] for k in saved} == saved == json.loads(json.dumps(results))
    assert run.summary["mse/10"] == results["mse"]["10"]
    assert [name for name, _, _ in rec.images] == ["fits"]
    assert any(f.startswith("media/images/fits_") for f in run.files)


@pytest.mark.slow
def test_omniglot_offline_run_reads_back(tmp_path, monkeypatch, shared_data, tmp_path_factory):
    """experiments.omniglot with --wandb offline: config, training curve, val/accuracy at each validation
    (as in validation.jsonl) and results.json as the summary, read back from the offline run file."""
    from experiments import omniglot

    zips = shared_data / "omniglot"
    if not (zips / "images_background_small1.zip").is_file():
        pytest.skip(f"real data not available: {zips} lacks the minimal Omniglot zips")
    out = tmp_path / "omni"
    results = omniglot.main([
        "--data-dir", str(zips), "--cache-dir", str(tmp_path_factory.getbasetemp() / "omniglot_tfds"),
        "--filters", "4", "--meta-batch", "2", "--queries", "2", "--iterations", "4", "--steps-per-call", "2",
        "--val-every", "2", "--val-tasks", "3", "--eval-tasks", "3", "--eval-steps", "1", "--no-progress",
        "--out", str(out), "--wandb", "offline", "--wandb-group", "tests"])

    (run_dir,) = find_offline_runs(out / "wandb")
    run = read_offline_run(run_dir, wait=30)
    assert run.exit_code == 0 and run.group == "tests" and run.job_type == "omniglot"
    assert run.config == json.loads((out / "config.json").read_text())
    assert run.config["iterations"] == 4 and run.config["wandb"] == "offline" and run.config["algorithm"] == "maml"
    assert [s for s, _ in run.scalars("train/meta_loss")] == [2, 4]
    validations = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert run.scalars("val/accuracy") == [(v["step"], v["val_accuracy"]) for v in validations]
    assert run.scalars("val/ci95") == [(v["step"], v["val_accuracy_ci95"]) for v in validations]
    assert [s for s, _ in run.scalars("val/accuracy")] == [2, 4]
    saved = json.loads((out / "results.json").read_text())
    assert {k: run.summary[k] for k in saved} == saved == json.loads(json.dumps(results))
    assert run.scalars("test_accuracy") == [(4, results["test_accuracy"])]
    # the sweep's metric (launch/sweeps/omniglot_bayes.yaml) is in the summary: the last validation
    assert flatten(run.summary)["val/accuracy"] == validations[-1]["val_accuracy"]


def test_disabled_writes_nothing_and_opens_no_socket(toy, monkeypatch):
    import toyexp

    events = []

    def deny(kind):
        def guarded(*args, **kwargs):
            events.append((kind, args[1:2]))
            raise OSError(f"test: {kind} is not allowed with --wandb disabled")
        return guarded

    for name in ("connect", "connect_ex", "bind", "listen"):
        monkeypatch.setattr(socket.socket, name, deny(name))
    monkeypatch.setattr(socket, "create_connection", deny("create_connection"))
    popen_init = subprocess.Popen.__init__

    def spy_popen(self, *args, **kwargs):
        events.append(("popen", args[:1]))
        return popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", spy_popen)
    toyexp.main(["--out", str(toy / "out"), "--wandb", "disabled"])
    assert events == []
    assert json.loads((toy / "out" / "results.json").read_text())["meta_iterations"] == 3
    assert not [p for p in toy.rglob("*wandb*") if p.name != "wandb-home"], "disabled mode wrote wandb files"
    assert not (toy / "wandb-home").exists()


def test_curvature_diagnostics_go_to_the_training_log(tmp_path, monkeypatch):
    from experiments import sinusoid

    from PIL import Image

    monkeypatch.setattr(sinusoid, "plot_fits", lambda path, *a, **k: Image.new("RGB", (16, 8), "white").save(path))
    out = tmp_path / "run"
    sinusoid.main(["--iterations", "40", "--steps-per-call", "20", "--checkpoint-every", "40", "--hidden", "8",
                   "--baseline-iterations", "10", "--eval-tasks", "4", "--eval-points", "4", "--eval-steps", "0,1",
                   "--curvature-every", "20", "--curvature-tasks", "2", "--no-progress", "--wandb", "offline",
                   "--out", str(out)])
    (run_dir,) = find_offline_runs(out / "wandb")
    history = read_offline_run(run_dir, wait=30).history
    with_curv = [r["_step"] for r in history if "curv/inner_stability_max" in r and "curv/meta_top" in r]
    assert with_curv == [20, 40]


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from experiments import sinusoid

    from PIL import Image

    monkeypatch.setattr(sinusoid, "plot_fits", lambda path, *a, **k: Image.new("RGB", (16, 8), "white").save(path))
    out = tmp_path / "sin"
    base = [a for a in TINY]
    sinusoid.main(base + ["--out", str(out), "--wandb", "offline"])
    run_id = (out / "wandb_run_id").read_text()
    i = base.index("--iterations")
    base[i + 1] = str(int(base[i + 1]) + 100)  # the same run, trained further: resumes from its checkpoint
    sinusoid.main(base + ["--out", str(out), "--wandb", "offline"])
    runs = find_offline_runs(out / "wandb", run_id)
    assert len(runs) == 2 and runs == find_offline_runs(out / "wandb")  # both parts, and nothing else
    assert (out / "wandb_run_id").read_text() == run_id


def test_offline_run_folders_by_id_with_wandbs_suffix(tmp_path):
    """wandb appends -N to a run's folder name when it is taken (a resumed run starting within the same second)."""
    names = ["offline-run-20261202_023305-abc", "offline-run-20261202_023304-abc-1", "offline-run-20261202_023304-abc",
             "offline-run-20261202_023304-abcd", "offline-run-20261202_023304-x-2", "offline-run-20261202_023309-abc-10",
             "offline-run-20261202_023309-abc-9"]
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-20261202_023306-abc.txt").write_text("not a run")
    got = lambda run_id: [p.name for p in find_offline_runs(tmp_path, run_id)]
    assert got("abc") == [names[2], names[1], names[0], names[6], names[5]]
    assert got("abcd") == [names[3]] and got("x-2") == [names[4]] and got("x") == [names[4]] and got("zz") == []
    assert len(got(None)) == len(names)
