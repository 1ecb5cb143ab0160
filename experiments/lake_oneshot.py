"""Lake et al.'s one-shot classification benchmark with a meta-trained Omniglot model.

    python -m experiments.lake_oneshot --runs PATH --checkpoint RUN_DIR [--out runs/lake_oneshot]

Rebuilds the model from RUN_DIR/config.json (an `experiments.omniglot` output folder), loads its latest
checkpoint, and on each of the runs (20-way 1-shot, within one alphabet) adapts it on the 20 training
images as the run's `--algorithm` adapts at evaluation (ANIL: the head only; Meta-SGD and MAML++ LSLR:
the learned rates; MAML++ per-step batch norm: step k's rows; iMAML: the proximal term), for
`--inner-steps` steps (default: the run's `eval_steps`) at `--inner-lr` (default: the run's `inner_lr`;
not allowed for learned rates), then classifies the 20 test items as one batch (batch norm uses that
batch's statistics, as in MAML's evaluation). Writes OUT/results.json: `error_rate` over all items (400
for the 20 original runs) and `per_run_error`.

The head: a 20-way checkpoint keeps its meta-learned head (`--head trained`). A checkpoint of another
number of ways has no head for 20 classes; `--head zero` (the default for it, via `--head auto`) replaces
the head by a zero 20-way head and adapts everything from there: the first inner step then learns only
the head (its gradient is each class's mean feature minus the overall mean), the usual zero-head trick
(e.g. Triantafillou et al. 2020, Ye & Chao 2022). That is not the MAML paper's protocol, so results.json
says which head was used; for the paper's setting meta-train with `--ways 20`. Meta-SGD's learned rates of
the replaced head become the mean of its learned head rates (per-layer rates need no change).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from data.lake_runs import load_lake_runs
from experiments import cli, runs
from experiments.config import POSITIVE, Checked, FlagError, flag, flag_of, one_of
from experiments.config_tree import to_flat

HEADS = ("auto", "trained", "zero")


@dataclass(frozen=True)
class LakeOneShotConfig(Checked):
    """Lake et al.'s 20-way one-shot runs, classified by an experiments.omniglot checkpoint."""

    runs: Optional[str] = flag(None, "folder or zip of Lake's runs (run01..run20) in their original layout (required)")
    checkpoint: Optional[str] = flag(None, "output folder of experiments.omniglot (config.json, checkpoints/) (required)")
    head: str = flag("auto", "classifier head: trained (needs a 20-way checkpoint), zero, or auto (trained if 20-way)",
                     rule=one_of(HEADS))
    inner_steps: Optional[int] = flag(None, "inner SGD steps on each run's training images (default: the run's "
                                      "algorithm's evaluation steps)", rule=POSITIVE)
    inner_lr: Optional[float] = flag(None, "inner SGD learning rate (default: the run's inner_lr)", rule=POSITIVE)
    out: str = flag("runs/lake_oneshot", "output folder (results.json)")

    def __post_init__(self):
        for name in ("runs", "checkpoint"):
            if not getattr(self, name):
                raise FlagError(flag_of(name), f"{flag_of(name)} is required")
        super().__post_init__()


def _head(model) -> tuple[Any, Any]:
    """The head's weight and bias of a Conv4, looking through a per-step wrapper (also for pytrees shaped
    like one, e.g. learned rates)."""
    if isinstance(model, maml.nn.PerStep):
        return _head(model.model)
    return model.head_weight, model.head_bias


def with_head(model, ways: int, head: str) -> tuple[Any, str]:
    """`model` (a `Conv4`, possibly per-step or wrapped in `maml.LearnedLR`) with a `ways`-way head as `head`
    asks; returns the model and what was done."""
    net = model.model if isinstance(model, maml.LearnedLR) else model
    classes = _head(net)[1].shape[0]
    if head == "auto":
        head = "trained" if classes == ways else "zero"
    if head == "trained":
        if classes != ways:
            raise ValueError(f"--head trained: the checkpoint is {classes}-way but the runs are {ways}-way; "
                             f"expected a {ways}-way checkpoint (meta-train with --ways {ways}) or --head zero")
        return model, f"trained ({classes}-way)"
    weight, bias = _head(net)
    new = (jnp.zeros((weight.shape[0], ways), weight.dtype), jnp.zeros((ways,), bias.dtype))
    done = f"zero ({ways}-way, replacing the checkpoint's {classes}-way head)"
    if not isinstance(model, maml.LearnedLR):
        return eqx.tree_at(_head, model, new), done
    # Meta-SGD's per-parameter rates have the head's shape: each new entry gets their mean. Per-layer rates
    # ([] or [steps]) do not depend on the number of classes and stay.
    per_parameter = lambda rate, old: not model.per_step and rate is not None and rate.shape == old.shape
    averaged = [per_parameter(r, o) for r, o in zip(_head(model.lr), _head(net))]
    rates = tuple(jnp.full_like(n, jnp.mean(r)) if a else r for r, n, a in zip(_head(model.lr), new, averaged))
    model = eqx.tree_at(lambda m: _head(m.model), model, new)
    model = eqx.tree_at(lambda m: _head(m.lr), model, rates, is_leaf=lambda x: x is None)
    return model, done[:-1] + "; its learned head rates: their mean)" if any(averaged) else done


@eqx.filter_jit
def predict(model, inner: maml.InnerLoop, strategy: maml.AbstractStrategy, train_x: jax.Array,
            test_x: jax.Array) -> jax.Array:
    """Adapt on one run's training images (class j is image j) as `strategy` does and return the test items'
    predicted classes (a per-step network at the last adapted step, as the query loss sees it)."""
    labels = jnp.arange(train_x.shape[0], dtype=jnp.int32)
    adapted = strategy.adapt(inner, model, train_x, labels).model
    return jnp.argmax(maml.nn.apply(maml.network(adapted, max(inner.steps - 1, 0)), test_x), axis=-1)


def _as_input(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images, jnp.float32)[..., None] / 255.0  # as data.episodes does: [N, 28, 28, 1] in [0, 1]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = cli.parse(LakeOneShotConfig, argv)
    run = runs.load(Path(config.checkpoint), expect=("omniglot",), expected="an experiments.omniglot output folder")
    lake = load_lake_runs(config.runs)
    learned = isinstance(run.algo.model, maml.LearnedLR)
    if learned and config.inner_lr is not None:
        raise FlagError("--inner-lr", f"--inner-lr={config.inner_lr} with a --algorithm={run.config.algorithm.name} "
                                      "run: its inner rates are meta-learned; drop the flag")
    model, head = with_head(run.state.model, lake.train_images.shape[1], config.head)
    with cli.run_folder(config.out, config) as out:
        inner = run.algo.inner.with_steps(config.inner_steps or run.config.algorithm.eval_steps[-1])
        if config.inner_lr is not None:
            inner = dataclasses.replace(inner, lr=config.inner_lr)
        wrong = np.stack([np.asarray(predict(model, inner, run.algo.evaluation, _as_input(tr), _as_input(te)))
                          != labels for tr, te, labels in zip(lake.train_images, lake.test_images, lake.test_labels)])
        results = {
            "error_rate": float(wrong.mean()),
            "per_run_error": {name: float(w.mean()) for name, w in zip(lake.names, wrong)},
            "items": int(wrong.size), "head": head, "inner_steps": inner.steps,
            "inner_lr": "learned" if learned else inner.lr, "algorithm": run.config.algorithm.name,
            "checkpoint_step": run.step, "params_sha256": maml.params_sha256(model),
            "run_config": to_flat(run.config), "config": to_flat(config),
        }
        maml.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
        print(json.dumps({k: results[k] for k in ("error_rate", "items", "head", "checkpoint_step")}))
    return results


if __name__ == "__main__":
    cli.run(main)
