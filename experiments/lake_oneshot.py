"""Lake et al.'s one-shot classification benchmark with a meta-trained Omniglot model.

    python -m experiments.lake_oneshot --runs PATH --checkpoint RUN_DIR [--out runs/lake_oneshot]

Rebuilds the model from RUN_DIR/config.json (an `experiments.omniglot` output folder), loads its latest
checkpoint, and on each of the runs (20-way 1-shot, within one alphabet) adapts it on the 20 training
images with the run's test-time inner loop (`--inner-steps`, `--inner-lr`: default the run's
`eval_steps` and `inner_lr`), then classifies the 20 test items as one batch (batch norm uses that batch's
statistics, as in MAML's evaluation). Writes OUT/results.json: `error_rate` over all items (400 for the
20 original runs) and `per_run_error`.

The head: a 20-way checkpoint keeps its meta-learned head (`--head trained`). A checkpoint of another
number of ways has no head for 20 classes; `--head zero` (the default for it, via `--head auto`) replaces
the head by a zero 20-way head and adapts everything from there: the first inner step then learns only
the head (its gradient is each class's mean feature minus the overall mean), the usual zero-head trick
(e.g. Triantafillou et al. 2020, Ye & Chao 2022). That is not the MAML paper's protocol, so results.json
says which head was used; for the paper's setting meta-train with `--ways 20`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from data.lake_runs import load_lake_runs
from experiments import cli
from experiments.omniglot import OmniglotConfig, initial_state

HEADS = ("auto", "trained", "zero")
# Fields that make a config.json an experiments.omniglot one (others, e.g. from mixins, may be added).
_OMNIGLOT_FIELDS = ("data_dir", "ways", "shots", "queries", "filters", "inner_lr", "eval_steps", "meta_batch")


_f = cli.flag


@dataclass(frozen=True)
class LakeOneShotConfig:
    """Lake et al.'s 20-way one-shot runs, classified by an experiments.omniglot checkpoint."""

    runs: Optional[str] = _f(None, "folder or zip of Lake's runs (run01..run20) in their original layout (required)")
    checkpoint: Optional[str] = _f(None, "output folder of experiments.omniglot (config.json, checkpoints/) (required)")
    head: str = _f("auto", "classifier head: trained (needs a 20-way checkpoint), zero, or auto (trained if 20-way)")
    inner_steps: Optional[int] = _f(None, "inner SGD steps on each run's training images (default: the run's eval_steps)")
    inner_lr: Optional[float] = _f(None, "inner SGD learning rate (default: the run's inner_lr)")
    out: str = _f("runs/lake_oneshot", "output folder (results.json)")

    def __post_init__(self):
        for name in ("runs", "checkpoint"):
            if not getattr(self, name):
                raise ValueError(f"{cli.field_flag(name)} is required")
        if self.head not in HEADS:
            raise ValueError(f"--head={self.head!r}; expected one of {', '.join(HEADS)}")
        cli.check_positive(self, "inner_steps", "inner_lr")


def load_run_config(run_dir: Path) -> OmniglotConfig:
    """The `OmniglotConfig` saved in `run_dir/config.json`; ValueError if it is not an omniglot run."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"--checkpoint {str(run_dir)!r} has no config.json; expected an experiments.omniglot "
                         "output folder")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--checkpoint: {path} is not valid JSON ({e})") from None
    missing = [k for k in _OMNIGLOT_FIELDS if k not in saved] if isinstance(saved, dict) else list(_OMNIGLOT_FIELDS)
    if missing:
        raise ValueError(f"--checkpoint {str(run_dir)!r} is not an experiments.omniglot run (its config.json lacks "
                         f"{', '.join(missing)}); expected an experiments.omniglot output folder")
    known = {f.name for f in dataclasses.fields(OmniglotConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return OmniglotConfig(**values)


def load_model(run_dir: Path, run_config: OmniglotConfig) -> tuple[maml.Conv4, int]:
    """The model of the newest checkpoint in `run_dir/checkpoints` and its meta-iteration."""
    like, _ = initial_state(run_config)
    found = maml.latest_checkpoint(run_dir / "checkpoints", like)
    if found is None:
        raise ValueError(f"--checkpoint {str(run_dir)!r} holds no checkpoint in checkpoints/; expected a trained "
                         "(or partly trained) experiments.omniglot run")
    return found[1].model, found[0]


def with_head(model: maml.Conv4, ways: int, head: str) -> tuple[maml.Conv4, str]:
    """`model` with a `ways`-way head as `head` asks; returns the model and what was done."""
    classes = model.head_bias.shape[0]
    if head == "auto":
        head = "trained" if classes == ways else "zero"
    if head == "trained":
        if classes != ways:
            raise ValueError(f"--head trained: the checkpoint is {classes}-way but the runs are {ways}-way; "
                             f"expected a {ways}-way checkpoint (meta-train with --ways {ways}) or --head zero")
        return model, f"trained ({classes}-way)"
    weight = jnp.zeros((model.head_weight.shape[0], ways), model.head_weight.dtype)
    bias = jnp.zeros((ways,), model.head_bias.dtype)
    model = eqx.tree_at(lambda m: (m.head_weight, m.head_bias), model, (weight, bias))
    return model, f"zero ({ways}-way, replacing the checkpoint's {classes}-way head)"


@eqx.filter_jit
def predict(model, inner: maml.InnerLoop, train_x: jax.Array, test_x: jax.Array) -> jax.Array:
    """Adapt on one run's training images (class j is image j) and return the test items' predicted classes."""
    adapted = inner.adapt(model, train_x, jnp.arange(train_x.shape[0], dtype=jnp.int32))[0]
    return jnp.argmax(maml.apply(adapted, test_x), axis=-1)


def _as_input(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images, jnp.float32)[..., None] / 255.0  # as data.episodes does: [N, 28, 28, 1] in [0, 1]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config = cli.parse(LakeOneShotConfig, argv)
    run_dir = Path(config.checkpoint)
    run_config = load_run_config(run_dir)
    runs = load_lake_runs(config.runs)
    ways = runs.train_images.shape[1]
    model, step = load_model(run_dir, run_config)
    model, head = with_head(model, ways, config.head)
    out = cli.prepare_out(config.out, config)
    inner = maml.InnerLoop(maml.losses.cross_entropy, config.inner_steps or run_config.eval_steps,
                           config.inner_lr or run_config.inner_lr)
    wrong = np.stack([np.asarray(predict(model, inner, _as_input(tr), _as_input(te))) != labels
                      for tr, te, labels in zip(runs.train_images, runs.test_images, runs.test_labels)])
    results = {
        "error_rate": float(wrong.mean()),
        "per_run_error": {name: float(w.mean()) for name, w in zip(runs.names, wrong)},
        "items": int(wrong.size),
        "head": head,
        "inner_steps": inner.steps,
        "inner_lr": inner.lr,
        "checkpoint_step": step,
        "params_sha256": maml.params_sha256(model),
        "run_config": cli.to_json(run_config),
        "config": cli.to_json(config),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("error_rate", "items", "head", "checkpoint_step")}))
    return results


if __name__ == "__main__":
    cli.run(main)
