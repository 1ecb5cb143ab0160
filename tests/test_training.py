"""The training loop and checkpoints: atomic files, exact resume after an interruption, corrupt files."""

import json

import jax
import optax
import pytest

import maml
from data.sinusoid import SinusoidTasks


def setup():
    optimizer = optax.adam(1e-3)
    inner = maml.InnerLoop(maml.losses.mse, 1, 0.01)
    step = maml.with_task_sampler(maml.make_train_step(optimizer, inner))
    model = maml.MLP(1, 1, (16, 16), key=jax.random.PRNGKey(0))
    return maml.init_state(model, optimizer, jax.random.PRNGKey(1)), step, SinusoidTasks(4, 5, 5)


class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_to_identical_parameters(tmp_path):
    state, step, sampler = setup()
    kw = dict(num_steps=120, steps_per_call=20, checkpoint_every=40, progress=False)
    straight = maml.fit(state, step, sampler, checkpoint_dir=tmp_path / "a", **kw)

    def stop_at_80(n, metrics):
        if n == 80:
            raise Interrupt

    with pytest.raises(Interrupt):
        maml.fit(state, step, sampler, checkpoint_dir=tmp_path / "b", on_chunk=stop_at_80, **kw)
    assert [p.name for p in maml.checkpoint.list_checkpoints(tmp_path / "b")] == ["ckpt_000000040.eqx", "ckpt_000000080.eqx"]
    resumed = maml.fit(state, step, sampler, checkpoint_dir=tmp_path / "b", **kw)  # fresh init, same dir
    assert int(resumed.step) == 120
    assert maml.params_sha256(resumed.model) == maml.params_sha256(straight.model)
    assert maml.params_sha256(resumed) == maml.params_sha256(straight)  # optimiser state and key too


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    state, step, sampler = setup()
    maml.fit(state, step, sampler, num_steps=40, steps_per_call=20, checkpoint_every=20,
             checkpoint_dir=tmp_path, progress=False)
    newest = tmp_path / "ckpt_000000040.eqx"
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated on disk
    with pytest.raises(ValueError, match=r"ckpt_000000040.eqx is corrupt"):
        maml.load_checkpoint(newest, state)
    with pytest.warns(UserWarning, match="falling back"):
        step_found, restored = maml.latest_checkpoint(tmp_path, state)
    assert step_found == 20 and int(restored.step) == 20


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    state, step, sampler = setup()
    maml.save_checkpoint(tmp_path, 5, state)
    other = maml.init_state(maml.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), optax.adam(1e-3), jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match=r"does not fit this model/config"):
        maml.latest_checkpoint(tmp_path, other)


def test_checkpoints_are_written_atomically_and_pruned(tmp_path):
    state, _, _ = setup()
    for s in range(1, 6):
        maml.save_checkpoint(tmp_path, s, state, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"ckpt_00000000{s}.{ext}" for s in (3, 4, 5) for ext in ("eqx", "json")]
    assert json.loads((tmp_path / "ckpt_000000005.json").read_text())["step"] == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, r"num_steps=0; expected a positive integer"),
    ({"num_steps": 10, "steps_per_call": -2}, r"steps_per_call=-2; expected a positive integer"),
    ({"num_steps": 10, "checkpoint_every": 0}, r"checkpoint_every=0; expected a positive integer"),
])
def test_fit_rejects_bad_settings(kwargs, match):
    state, step, sampler = setup()
    with pytest.raises(ValueError, match=match):
        maml.fit(state, step, sampler, progress=False, **kwargs)


def test_divergence_stops_with_step_and_quantity_and_keeps_last_good_checkpoint(tmp_path):
    optimizer = optax.adam(1e-3)
    # an inner loss that turns NaN once the step counter passes 50: inject through the sampler's data
    inner = maml.InnerLoop(maml.losses.mse, 1, 0.01)
    train_step = maml.make_train_step(optimizer, inner)

    def poisoned(state, tasks):
        bad = state.step >= 50
        tasks = jax.tree.map(lambda a: jax.numpy.where(bad, jax.numpy.nan, a), tasks)
        return train_step(state, tasks)

    step = maml.with_task_sampler(poisoned)
    state = maml.init_state(maml.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    with pytest.raises(maml.training.Diverged, match=r"the meta-loss is nan at step 51; stopped, the last good checkpoint \(step 40\) is kept"):
        maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20, checkpoint_every=20,
                 checkpoint_dir=tmp_path, progress=False)
    assert maml.checkpoint.list_checkpoints(tmp_path)[-1].name == "ckpt_000000040.eqx"
    # skipping instead: optax.apply_if_finite keeps the parameters and counts the skipped steps
    skipping = optax.apply_if_finite(optimizer, max_consecutive_errors=1000)
    train_step = maml.make_train_step(skipping, inner)
    state = maml.init_state(maml.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), skipping, jax.random.PRNGKey(1))
    final = maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20, progress=False,
                     skip_nonfinite=True)
    assert maml.training.skipped_steps(final.opt_state) == 50 and int(final.opt_state.total_notfinite) == 50
    assert maml.training.skipped_steps(state.opt_state) == 0 and maml.training.skipped_steps(optax.adam(1e-3).init({})) == 0
    # without skip_nonfinite a NaN meta-loss stops the run even though the (skipping) optimiser kept the
    # parameters finite
    with pytest.raises(maml.training.Diverged, match=r"the meta-loss is nan at step 51; stopped, no checkpoint kept"):
        maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20, progress=False)


def test_diagnostics_run_every_n_steps_and_do_not_change_training(tmp_path):
    state, step, sampler = setup()
    seen = []
    diagnose = lambda s: {"param_norm": sum(float((a ** 2).sum()) for a in jax.tree.leaves(s.model))}
    with_diag = maml.fit(state, step, sampler, num_steps=60, steps_per_call=25, progress=False,
                         diagnose=diagnose, diagnose_every=20,
                         on_chunk=lambda n, m: seen.append((n, "param_norm" in m)))
    plain = maml.fit(state, step, sampler, num_steps=60, steps_per_call=25, progress=False)
    assert [n for n, has in seen if has] == [20, 40, 60]
    assert maml.params_sha256(with_diag) == maml.params_sha256(plain)
