"""The sinusoid experiment's figure: fits of a few held-out tasks after 0, 1 and 10 inner steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import maml
from data.sinusoid import X_RANGE, sample_tasks, sine


@eqx.filter_jit
def fit_curves(model, tasks: maml.Task, inner: maml.InnerLoop, strategy: maml.AbstractStrategy, steps: tuple,
               grid: jax.Array) -> jax.Array:
    """Per task, predictions on `grid [G, 1]` after each of `steps` inner steps (adapting as the algorithm
    does): `[B, len(steps), G, 1]`."""

    def curves(task):
        def after(k):
            adapted = strategy.adapt(inner.with_steps(k), model, task.support_x, task.support_y).model
            return maml.nn.apply(maml.network(adapted, max(k - 1, 0)), grid)

        return jnp.stack([after(k) for k in steps])

    return jax.vmap(curves)(tasks)


def plot_fits(path: Path, models: Mapping[str, tuple[Any, Any]], shots: int, key: jax.Array, num: int = 3,
              steps: tuple = (0, 1, 10)) -> None:
    """`models`: label -> (model, its `experiments.algorithms.Algorithm`); writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, amp, phase = sample_tasks(key, num, shots, 1)
    grid = jnp.linspace(*X_RANGE, 200)[:, None]
    preds = {name: np.asarray(fit_curves(model, tasks, algo.inner, algo.evaluation, steps, grid))
             for name, (model, algo) in models.items()}
    fig, axes = plt.subplots(1, num, figsize=(5 * num, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(grid, sine(amp[i], phase[i], grid), "k-", lw=2, label="true")
        ax.plot(tasks.support_x[i], tasks.support_y[i], "k^", ms=8, label=f"{shots} support points")
        for name, color in zip(models, ("C0", "C1")):
            for j, (k, style) in enumerate(zip(steps, (":", "--", "-"))):
                ax.plot(grid, preds[name][i, j], style, color=color, label=f"{name}, {k} steps")
        ax.set_title(f"A={float(amp[i]):.2f}, phase={float(phase[i]):.2f}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
