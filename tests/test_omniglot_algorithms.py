"""Every --algorithm of experiments.omniglot end to end on the real data at a tiny size (a file of its own,
so that pytest-xdist runs it beside tests/test_omniglot_experiment.py instead of after it)."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest

from experiments import algorithms, cli, evaluation, lake_oneshot, omniglot
from test_omniglot_experiment import (MINI, data_args, final_params, lake_dir, omniglot_dir,  # noqa: F401 (fixtures)
                                      xla_cache)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", algorithms.NAMES)
def test_every_algorithm_runs_end_to_end(algorithm, data_args, lake_dir, tmp_path, monkeypatch):
    """Each --algorithm trains for 3 meta-iterations on the real data at a tiny size, validates and tests,
    adapting at evaluation with the algorithm's own inner loop and strategy (mamlpp: per-step batch norm);
    then Lake's one-shot runs (20-way, so a zero head) are classified with the checkpoint the same way."""
    extra = {"mamlpp": ["--mamlpp-per-step-bn", "--inner-steps", "2", "--mamlpp-first-order-iterations", "1"]}
    argv = [*data_args, *MINI, "--iterations", "3", "--algorithm", algorithm, *extra.get(algorithm, [])]
    seen = []
    real = evaluation.evaluate_episodes

    def spy(model, images, episodes, key, num_tasks, inner, strategy, steps):
        seen.append((model, inner, strategy, steps))
        return real(model, images, episodes, key, num_tasks, inner, strategy, steps)

    monkeypatch.setattr(evaluation, "evaluate_episodes", spy)
    results = omniglot.main([*argv, "--out", str(tmp_path / "run")])
    assert results["meta_iterations"] == 3 and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["config"]["algorithm"] == algorithm
    config = cli.parse(omniglot.OmniglotConfig, argv, omniglot.algorithms)
    expected = omniglot.setup(config).algo
    assert len(seen) == 2  # validation at step 3, then the test tasks
    for model, inner, strategy, steps in seen:  # adapting as the algorithm does at evaluation, for its steps
        assert eqx.tree_equal(inner, expected.inner) and steps == config.algorithm.eval_steps == (1,)
        assert type(strategy) is type(expected.evaluation)
        assert jax.tree.structure(eqx.filter(model, eqx.is_array)) == \
            jax.tree.structure(eqx.filter(expected.model, eqx.is_array))
    params, init = final_params(tmp_path / "run")
    assert all(np.all(np.isfinite(p)) for p in params) and any(not np.array_equal(p, q) for p, q in zip(params, init))
    # Lake's runs adapt the checkpoint as the algorithm does (a zero 20-way head; Meta-SGD's per-parameter
    # head rates become their mean)
    seen.clear()
    real_predict = lake_oneshot.predict
    monkeypatch.setattr(lake_oneshot, "predict", lambda *a: seen.append(a) or real_predict(*a))
    lake = lake_oneshot.main(["--runs", str(lake_dir), "--checkpoint", str(tmp_path / "run"),
                              "--out", str(tmp_path / "lake")])
    assert lake["items"] == 400 and 0.0 <= lake["error_rate"] <= 1.0 and lake["algorithm"] == algorithm
    assert lake["head"].startswith("zero (20-way") and lake["checkpoint_step"] == 3
    assert ("their mean" in lake["head"]) == (algorithm == "metasgd")
    assert lake["inner_lr"] == ("learned" if algorithm in ("metasgd", "mamlpp") else config.algorithm.inner_lr)
    model, inner, strategy = seen[0][:3]
    assert eqx.tree_equal(inner, expected.inner.with_steps(config.algorithm.eval_steps[-1]))
    assert type(strategy) is type(expected.evaluation)
    head_shapes = [leaf.shape for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)) if 20 in leaf.shape[-1:]]
    assert head_shapes, "the 20-way head is in the model"
