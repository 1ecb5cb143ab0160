"""Every algorithm learns at its own defaults on the real sinusoid entry point, and evaluation never hides a
divergence: a short run (only the iteration budget shortened) beats half of the pretrained baseline at every
one of its default evaluation step counts, and every number it reports is finite; a model forced to diverge
at evaluation gives finite means, a diverged count and a message, never a NaN in results.json."""

from __future__ import annotations

import json
import math

import pytest

from experiments import algorithms, cli, sinusoid

ITERATIONS = {"maml": 3000, "fomaml": 3000, "anil": 3000, "metasgd": 3000, "mamlpp": 5000, "reptile": 5000,
              "imaml": 3000}


def numbers(tree, path=""):
    """Every number in a results tree, with its path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.slow
@pytest.mark.parametrize("name", algorithms.NAMES)
def test_each_algorithm_learns_at_its_defaults(name, tmp_path):
    out = tmp_path / name
    results = sinusoid.main(["--algorithm", name, "--iterations", str(ITERATIONS[name]), "--no-progress",
                             "--wandb", "disabled", "--out", str(out)])
    steps = sinusoid.algorithms({"ways": None})[name].eval_steps
    assert results["config"]["eval_steps"] == list(steps)
    saved = json.loads((out / "results.json").read_text())  # strict JSON: a NaN would not even parse back
    bad = [(p, v) for p, v in numbers(saved) if not math.isfinite(v)]
    assert not bad, bad
    for k in steps:
        if k == 0:
            continue
        assert results["mse_diverged"][str(k)] == 0, results
        assert results["mse"][str(k)] < 0.5 * results["baseline_mse"][str(k)], (k, results["mse"], results["baseline_mse"])


def test_a_diverging_evaluation_is_counted_and_said(tmp_path, capsys):
    """Meta-SGD's rates started at 0.5-0.6 and left untrained (1 iteration): 50 evaluation steps blow up."""
    out = tmp_path / "run"
    results = sinusoid.main(["--algorithm", "metasgd", "--metasgd-init-low", "0.5", "--metasgd-init-high", "0.6",
                             "--eval-steps", "0,1,50", "--iterations", "2", "--steps-per-call", "1",
                             "--baseline-iterations", "10", "--eval-tasks", "40", "--eval-points", "10", "--no-progress",
                             "--wandb", "disabled", "--out", str(out)])
    err = capsys.readouterr().err
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    saved = json.loads(text)
    n = saved["mse_diverged"]["50"]
    assert 0 < n <= 40 and saved["mse_diverged_fraction"]["50"] == n / 40
    assert saved["mse"]["50"] is None or math.isfinite(saved["mse"]["50"])
    assert math.isfinite(saved["mse"]["0"]) and saved["mse_diverged"]["0"] == 0
    assert f"after 50 step(s) {n} of 40 tasks diverged" in err and "the figures are over the other" in err
    assert "steps 2..50 apply the same rates again" in err  # learned for one step, reused past it
    stab = saved["diverged_stability"]
    assert len(stab["values"]) == min(n, 16) and all(v > 0 for v in stab["values"])
    assert results["notes"] == saved["notes"]


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "maml", "--reptile-step-size", "0.1"],
     "--reptile-step-size is an option of --algorithm reptile, not of --algorithm maml; drop the flag"),
    (["--algorithm", "reptile", "--reptile-step-size", "0"], "--reptile-step-size=0.0; expected a positive number"),
    (["--algorithm", "imaml", "--imaml-lambda", "-1"], "--imaml-lambda=-1.0; expected a positive number"),
    (["--algorithm", "imaml", "--imaml-solver", "newton"], "--imaml-solver='newton'; expected one of gd, hf"),
    (["--algorithm", "maml", "--mamlpp-cosine-iterations", "10"],
     "--mamlpp-cosine-iterations is an option of --algorithm mamlpp, not of --algorithm maml; drop the flag"),
])
def test_algorithm_options_are_checked(argv, message):
    with pytest.raises(ValueError) as e:
        cli.parse(sinusoid.SinusoidConfig, argv, sinusoid.algorithms)
    assert str(e.value) == message


def test_schedules_do_not_depend_on_the_iteration_budget():
    """Reptile's annealing and MAML++'s cosine are fields of their own: a longer run keeps the schedule."""
    short, long = (cli.parse(sinusoid.SinusoidConfig, ["--algorithm", a, "--iterations", n], sinusoid.algorithms)
                   for a, n in (("reptile", "100"), ("reptile", "100000")))
    assert short.algorithm == long.algorithm
    short, long = (cli.parse(sinusoid.SinusoidConfig, ["--algorithm", "mamlpp", "--iterations", n], sinusoid.algorithms)
                   for n in ("100", "100000"))
    assert short.algorithm == long.algorithm and short.algorithm.cosine_iterations == 70_000


def test_the_readme_lists_each_algorithms_defaults():
    """Every flag cell of README's algorithm table is exactly that algorithm's default in that experiment."""
    import re
    import shlex
    from pathlib import Path

    from experiments import fewshot, omniglot

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Algorithms", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| `([^`]*)` \| `([^`]*)` \| `([^`]*)` \|", section.split("\n## ", 1)[0],
                      re.M)
    assert [r[0] for r in rows] == list(algorithms.NAMES)
    settings = ((sinusoid.CONFIG, sinusoid.algorithms, []), (omniglot.CONFIG, omniglot.algorithms, ["--data-dir", "x"]),
                (omniglot.CONFIG, omniglot.algorithms, ["--data-dir", "x", "--ways", "20"]),
                (fewshot.CONFIG, fewshot.algorithms, ["--data-dir", "x", "--dataset", "mini_imagenet"]))
    for name, *cells in rows:
        for (cls, registry, extra), cell in zip(settings, cells):
            listed = cli.parse(cls, [*extra, "--algorithm", name, *shlex.split(cell)], registry).algorithm
            assert listed == cli.parse(cls, [*extra, "--algorithm", name], registry).algorithm, (name, cell)
