"""`experiments.fewshot` as a user runs it, on a synthetic colour CIFAR-FS (a `cifar-100-python.tar.gz` in the
real format whose classes differ in colour): it learns well above chance, resumes to the same parameters,
validates on the validation split, and rejects bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import maml

from data.images import CIFAR_FS_SPLITS
from experiments import cli, episodic, fewshot
from test_image_data import write_cifar_tarball

# 5-way 1-shot with the defaults of the natural-image benchmarks (MAML: 5 inner steps of 0.01, 10 at test,
# meta-batch 4), on a small Conv4 and few queries so that it runs in seconds.
SMALL = ["--dataset", "cifar_fs", "--filters", "8", "--queries", "3", "--val-tasks", "20", "--eval-tasks", "100",
         "--no-progress", "--wandb", "disabled"]


def _coloured(label: int, k: int) -> np.ndarray:
    """Class `label` is a colour (its own mix of the three channels) with per-image noise."""
    rng = np.random.default_rng(label * 1000 + k)
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], np.float64)
    return np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar_tarball(folder / "cifar-100-python.tar.gz", train_per_class=4, test_per_class=2, image=_coloured)
    args = ["--data-dir", str(folder), "--cache-dir", str(tmp_path_factory.mktemp("tfds"))]
    # Build the tfds cache now, so that no test's stderr depends on being the first to build it.
    data = cli.parse(fewshot.FewShotConfig, [*args, *SMALL], fewshot.algorithms).data
    data.source.splits(data.data_dir, data.cache_dir, data.download)
    return args


def test_defaults_resolve_per_dataset(cifar):
    config = cli.parse(fewshot.FewShotConfig, [*cifar, "--dataset", "cifar_fs"], fewshot.algorithms)
    assert config.training.meta_batch == 4 and config.model.filters == 32 and config.data.queries == 15
    assert (config.algorithm.name, config.algorithm.inner_steps, config.algorithm.inner_lr) == ("maml", 5, 0.01)
    assert config.algorithm.eval_steps == (10,) and not config.data.episodes.rotate
    five = cli.parse(fewshot.FewShotConfig, [*cifar, "--dataset", "mini_imagenet", "--shots", "5"], fewshot.algorithms)
    assert five.training.meta_batch == 2
    omni = cli.parse(fewshot.FewShotConfig, [*cifar, "--dataset", "omniglot"], fewshot.algorithms)
    assert omni.training.meta_batch == 32 and omni.model.filters == 64 and omni.data.episodes.rotate
    assert (omni.algorithm.inner_steps, omni.algorithm.inner_lr, omni.algorithm.eval_steps) == (1, 0.4, (3,))


def test_batching_defaults_per_backend_and_the_flag_overrides(cifar):
    """Unset, --batching is the backend's measured default (Map on CPU, Vmap on accelerators); set, it wins."""
    config = cli.parse(fewshot.FewShotConfig, [*cifar, "--dataset", "cifar_fs"], fewshot.algorithms)
    assert config.model.batching is None
    assert episodic.batching(config.model.batching, "cpu") == maml.Map()
    assert episodic.batching(config.model.batching, "gpu") == episodic.batching(None, "tpu") == maml.Vmap()
    chosen = cli.parse(fewshot.FewShotConfig, [*cifar, "--batching", "unroll"], fewshot.algorithms)
    assert episodic.batching(chosen.model.batching, "cpu") == episodic.batching("unroll", "gpu") == maml.Unroll()
    with pytest.raises(ValueError, match="platform: ''"):
        maml.convolution_batching("")


@pytest.mark.slow
def test_learns_on_colour_data_and_resumes_to_the_same_parameters(cifar, tmp_path):
    full = fewshot.main([*cifar, *SMALL, "--iterations", "40", "--val-every", "20", "--out", str(tmp_path / "full")])
    assert results_ok(full) and full["test_accuracy"] > 0.6, full["test_accuracy"]  # chance: 0.2
    assert full["test_classes"] == sorted(CIFAR_FS_SPLITS["test"]) and full["classes"] == \
        {"train": 64, "validation": 16, "test": 20}
    assert full["batching"] == "Map()"  # the CPU default, unasked
    assert full["config"]["meta_batch"] == 4 and full["config"]["inner_steps"] == 5 and full["test_steps"] == 10
    validation = [json.loads(line) for line in (tmp_path / "full" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [20, 40] and all(v["val_accuracy"] > 0.2 for v in validation)
    half = fewshot.main([*cifar, *SMALL, "--iterations", "20", "--val-every", "20", "--out", str(tmp_path / "resumed")])
    assert half["meta_iterations"] == 20
    resumed = fewshot.main([*cifar, *SMALL, "--iterations", "40", "--val-every", "20", "--out", str(tmp_path / "resumed")])
    assert resumed["params_sha256"] == full["params_sha256"]


def results_ok(results: dict) -> bool:
    return results["test_tasks"] == 100 and results["meta_iterations"] == 40 and results["test_diverged_tasks"] == 0


def test_resnet12_backbone_runs(cifar, tmp_path):
    results = fewshot.main([*cifar, *SMALL, "--backbone", "resnet12", "--widths", "4,6,8,10", "--inner-steps", "1",
                            "--eval-steps", "1", "--iterations", "1", "--val-every", "1", "--eval-tasks", "4",
                            "--out", str(tmp_path / "r")])
    assert results["meta_iterations"] == 1 and 0 <= results["test_accuracy"] <= 1
    assert results["config"]["backbone"] == "resnet12" and results["config"]["widths"] == [4, 6, 8, 10]


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(fewshot.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(cifar, tmp_path, capsys):
    err = one_line_error(capsys, [*cifar, *SMALL, "--ways", "30", "--out", str(tmp_path / "a")])
    assert "validation split" in err and "ways=30 is more than the split's 16 classes" in err
    assert not (tmp_path / "a").exists()
    err = one_line_error(capsys, ["--dataset", "mini_imagenet", "--data-dir", str(tmp_path), "--download"])
    assert "--download with --dataset mini_imagenet" in err
    err = one_line_error(capsys, ["--dataset", "imagenet", "--data-dir", str(tmp_path)])
    assert "--dataset='imagenet'; expected one of omniglot, mini_imagenet" in err
    err = one_line_error(capsys, ["--dataset", "fc100", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b")])
    assert "holds none of the known files" in err
    err = one_line_error(capsys, ["--dataset", "cifar_fs", "--backbone", "resnet50", "--data-dir", str(tmp_path)])
    assert "--backbone='resnet50'; expected one of conv4, resnet12" in err
