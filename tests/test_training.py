"""The training loop and checkpoints: atomic files, exact resume after an interruption, corrupt files."""

import errno
import json
import os

import jax
import optax
import pytest

import maml
from data.sinusoid import SinusoidTasks


def setup():
    optimizer = optax.adam(1e-3)
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    step = maml.with_task_sampler(maml.make_train_step(optimizer, inner))
    model = maml.nn.MLP(1, 1, (16, 16), key=jax.random.PRNGKey(0))
    return maml.init_state(model, optimizer, jax.random.PRNGKey(1)), step, SinusoidTasks(4, 5, 5)


class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_to_identical_parameters(tmp_path):
    state, step, sampler = setup()
    kw = dict(num_steps=120, steps_per_call=20, progress=False)
    straight = maml.fit(state, step, sampler, checkpointer=maml.Checkpointer(tmp_path / "a", 40), **kw).state

    def stop_at_80(info):
        if info.step == 80:
            raise Interrupt

    with pytest.raises(Interrupt):
        maml.fit(state, step, sampler, checkpointer=maml.Checkpointer(tmp_path / "b", 40),
                 hooks=[maml.Hook(stop_at_80, 20)], **kw)
    assert [p.name for p in maml.list_checkpoints(tmp_path / "b")] == ["ckpt_000000040.eqx", "ckpt_000000080.eqx"]
    resumed = maml.fit(state, step, sampler, checkpointer=maml.Checkpointer(tmp_path / "b", 40), **kw).state  # fresh init, same dir
    assert int(resumed.step) == 120
    assert maml.params_sha256(resumed.model) == maml.params_sha256(straight.model)
    assert maml.params_sha256(resumed) == maml.params_sha256(straight)  # optimiser state and key too


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    state, step, sampler = setup()
    maml.fit(state, step, sampler, num_steps=40, steps_per_call=20, checkpointer=maml.Checkpointer(tmp_path, 20),
             progress=False)
    newest = tmp_path / "ckpt_000000040.eqx"
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated on disk
    with pytest.raises(maml.CorruptCheckpoint, match=r"ckpt_000000040.eqx is corrupt"):
        maml.load_checkpoint(newest, state)
    with pytest.warns(UserWarning, match="falling back"):
        step_found, restored = maml.latest_checkpoint(tmp_path, state)
    assert step_found == 20 and int(restored.step) == 20


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    state, step, sampler = setup()
    maml.save_checkpoint(tmp_path, 5, state)
    other = maml.init_state(maml.nn.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), optax.adam(1e-3), jax.random.PRNGKey(1))
    with pytest.raises(maml.IncompatibleCheckpoint, match=r"does not fit this model/config"):
        maml.latest_checkpoint(tmp_path, other)


def test_checkpoints_are_written_atomically_and_pruned(tmp_path):
    state, _, _ = setup()
    for s in range(1, 6):
        maml.save_checkpoint(tmp_path, s, state, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"ckpt_00000000{s}.{ext}" for s in (3, 4, 5) for ext in ("eqx", "json")]
    assert json.loads((tmp_path / "ckpt_000000005.json").read_text())["step"] == 5


def test_a_full_disk_leaves_no_partial_file_and_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    state, _, _ = setup()
    maml.save_checkpoint(tmp_path, 1, state)
    before = sorted(p.name for p in tmp_path.iterdir())

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the disk fills up while the data is flushed
    with pytest.raises(OSError):
        maml.atomic_write_bytes(tmp_path / "ckpt_000000001.eqx", b"new bytes")
    with pytest.raises(maml.CheckpointWriteError) as failed:
        maml.save_checkpoint(tmp_path, 2, state)
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC
    assert str(failed.value) == (f"could not write checkpoint {tmp_path / 'ckpt_000000002.eqx'} (No space left on "
                                 "device); the newest complete checkpoint (step 1) is kept; free some space and run "
                                 "the same command to resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file, no half of checkpoint 2
    assert maml.latest_checkpoint(tmp_path, state)[0] == 1


def test_a_checkpoint_whose_sidecar_cannot_be_written_is_removed(tmp_path):
    state, _, _ = setup()

    def sidecar_fails(path, data):
        if path.suffix == ".json":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        maml.atomic_write_bytes(path, data)

    with pytest.raises(maml.CheckpointWriteError, match=r"\(Read-only file system\); there is no earlier checkpoint"):
        maml.Checkpointer(tmp_path, 1, write=sidecar_fails).save(3, state)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, r"num_steps=0; expected a positive integer"),
    ({"num_steps": 10, "steps_per_call": -2}, r"steps_per_call=-2; expected a positive integer"),
    ({"num_steps": 10, "hooks": [lambda info: None]}, r"hooks holds a function; expected maml.Hook values"),
])
def test_fit_rejects_bad_settings(kwargs, match):
    state, step, sampler = setup()
    with pytest.raises(ValueError, match=match):
        maml.fit(state, step, sampler, progress=False, **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda tmp: maml.Checkpointer(tmp, 0), r"Checkpointer: every=0; expected a positive integer"),
    (lambda tmp: maml.Checkpointer(tmp, 5, keep=0), r"Checkpointer: keep=0; expected a positive integer"),
    (lambda tmp: maml.Hook(print, -1), r"Hook: every=-1; expected a positive integer"),
])
def test_hook_and_checkpointer_reject_bad_periods(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path)


def test_divergence_stops_with_step_and_quantity_and_keeps_last_good_checkpoint(tmp_path):
    optimizer = optax.adam(1e-3)
    # an inner loss that turns NaN once the step counter passes 50: inject through the sampler's data
    inner = maml.InnerLoop(maml.nn.mse, 1, 0.01)
    train_step = maml.make_train_step(optimizer, inner)

    def poisoned(state, tasks):
        bad = state.step >= 50
        tasks = jax.tree.map(lambda a: jax.numpy.where(bad, jax.numpy.nan, a), tasks)
        return train_step(state, tasks)

    step = maml.with_task_sampler(poisoned)
    state = maml.init_state(maml.nn.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    with pytest.raises(maml.Diverged, match=r"the meta-loss is nan at step 51; stopped, the last good checkpoint \(step 40\) is kept"):
        maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20,
                 checkpointer=maml.Checkpointer(tmp_path, 20), progress=False)
    assert maml.list_checkpoints(tmp_path)[-1].name == "ckpt_000000040.eqx"
    # skipping instead: an optimiser wrapped in optax.apply_if_finite keeps the parameters and counts the
    # skipped steps; fit reads that from the optimiser state (no flag)
    skipping = optax.apply_if_finite(optimizer, max_consecutive_errors=1000)
    train_step = maml.make_train_step(skipping, inner)
    state = maml.init_state(maml.nn.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), skipping, jax.random.PRNGKey(1))
    final = maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20, progress=False).state
    assert maml.skipped_steps(final.opt_state) == 50 and int(final.opt_state.total_notfinite) == 50
    assert maml.skipped_steps(state.opt_state) == 0 and maml.skipped_steps(optax.adam(1e-3).init({})) == 0
    # once the optimiser may skip no more, the parameters turn non-finite and the run stops
    few = optax.apply_if_finite(optimizer, max_consecutive_errors=3)
    train_step = maml.make_train_step(few, inner)
    state = maml.init_state(maml.nn.MLP(1, 1, (8,), key=jax.random.PRNGKey(0)), few, jax.random.PRNGKey(1))
    with pytest.raises(maml.Diverged, match=r"turned non-finite between steps 41 and 60 \(more non-finite steps in "
                                            r"a row than the optimiser may skip\); stopped, no checkpoint kept"):
        maml.fit(state, step, SinusoidTasks(2, 3, 3), num_steps=100, steps_per_call=20, progress=False)


def test_hooks_run_every_n_steps_and_do_not_change_training(tmp_path):
    state, step, sampler = setup()
    seen, logged = [], []
    norm = lambda info: seen.append((info.step, sum(float((a ** 2).sum()) for a in jax.tree.leaves(info.state.model))))
    log = lambda info: logged.append((info.step, info.metrics["meta_loss"].shape, info.final))
    with_hooks = maml.fit(state, step, sampler, num_steps=60, steps_per_call=25, progress=False,
                          hooks=[maml.Hook(norm, 20), maml.Hook(log, 25)]).state
    plain = maml.fit(state, step, sampler, num_steps=60, steps_per_call=25, progress=False).state
    assert [n for n, _ in seen] == [20, 40, 60]
    # each call sees the metrics of every step since the hook last ran; the end is a last call
    assert logged == [(25, (25,), False), (50, (25,), False), (60, (10,), True)]
    assert maml.params_sha256(with_hooks) == maml.params_sha256(plain)


def test_a_hook_stops_training_with_its_reason_and_the_stop_is_checkpointed(tmp_path):
    state, step, sampler = setup()
    seen = []
    late = lambda info: maml.Stop("out of time") if info.step >= 30 else None
    result = maml.fit(state, step, sampler, num_steps=100, steps_per_call=10, progress=False,
                      checkpointer=maml.Checkpointer(tmp_path, 50),
                      hooks=[maml.Hook(late, 15, at_end=False), maml.Hook(lambda i: seen.append((i.step, i.final)), 20)])
    assert result.stopped_by == "out of time" and int(result.state.step) == 30
    assert seen == [(20, False), (30, True)]  # the other hook's last call, at the stop
    assert [p.name for p in maml.list_checkpoints(tmp_path)] == ["ckpt_000000030.eqx"]
    assert maml.fit(state, step, sampler, num_steps=40, steps_per_call=10, progress=False).stopped_by == "num_steps"
