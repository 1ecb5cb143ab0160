"""The benchmark workloads (same maths for every implementation) and their synthetic task batches.

Inputs are synthetic (random images, balanced labels): the benchmarks measure compute, not accuracy.
Arrays are numpy, NHWC for images; peers convert to their own layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """One meta-training step's shape: model, task batch, inner loop, order; outer optimiser Adam 1e-3."""

    name: str
    model: str  # "conv4" or "mlp"
    ways: int
    shots: int
    queries: int  # per class for conv4, per task for mlp
    steps: int
    inner_lr: float
    meta_batch: int
    second_order: bool = True
    image_size: int = 28
    filters: int = 64
    channels: int = 1
    outer_lr: float = 1e-3

    @property
    def support_size(self) -> int:
        return self.ways * self.shots if self.model == "conv4" else self.shots

    @property
    def query_size(self) -> int:
        return self.ways * self.queries if self.model == "conv4" else self.queries


WORKLOADS = {
    w.name: w
    for w in (
        Workload("omniglot-5w1s-2nd", "conv4", 5, 1, 15, 1, 0.4, 32),
        Workload("omniglot-5w1s-1st", "conv4", 5, 1, 15, 1, 0.4, 32, second_order=False),
        Workload("omniglot-20w1s-5step", "conv4", 20, 1, 15, 5, 0.1, 16),
        # MAML's mini-ImageNet Conv4 (Finn et al. 2017): 84x84x3, 32 filters, 5 steps of 0.01, meta-batch 4
        Workload("miniimagenet-5w1s-5step", "conv4", 5, 1, 15, 5, 0.01, 4, image_size=84, filters=32, channels=3),
        Workload("sinusoid", "mlp", 1, 10, 10, 1, 0.01, 25),
    )
}


def synthetic_batch(w: Workload, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """`support_x [B, S, ...]`, `support_y [B, S]` (int labels, or `[B, S, 1]` targets), query likewise."""
    rng = np.random.default_rng(seed)
    b = w.meta_batch
    if w.model == "conv4":
        shape = (w.image_size, w.image_size, w.channels)
        sx = rng.random((b, w.support_size, *shape)).astype(dtype)
        qx = rng.random((b, w.query_size, *shape)).astype(dtype)
        sy = np.tile(np.repeat(np.arange(w.ways), w.shots), (b, 1)).astype(np.int32)
        qy = np.tile(np.repeat(np.arange(w.ways), w.queries), (b, 1)).astype(np.int32)
        return {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
    amp = rng.uniform(0.1, 5.0, (b, 1, 1))
    phase = rng.uniform(0, np.pi, (b, 1, 1))
    x = rng.uniform(-5, 5, (b, w.shots + w.queries, 1))
    y = amp * np.sin(x - phase)
    return {
        "support_x": x[:, : w.shots].astype(dtype), "support_y": y[:, : w.shots].astype(dtype),
        "query_x": x[:, w.shots :].astype(dtype), "query_y": y[:, w.shots :].astype(dtype),
    }
