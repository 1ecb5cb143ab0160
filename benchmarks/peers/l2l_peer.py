"""learn2learn: `MAML(model, lr, first_order)`, `clone()` and `adapt()` per task, `.backward()` per task."""

from __future__ import annotations

import learn2learn as l2l
import torch

from .common import TorchPeer


class L2L(TorchPeer):
    def __init__(self, workload, params, batch, dtype=torch.float32):
        super().__init__(workload, params, batch, dtype)
        self.maml = l2l.algorithms.MAML(self.model, lr=workload.inner_lr, first_order=not workload.second_order)

    def accumulate_grads(self):
        w, loss = self.w, self.loss
        for sx, sy, qx, qy in self.tasks():
            learner = self.maml.clone()
            for _ in range(w.steps):
                learner.adapt(loss(learner(sx), sy))
            (loss(learner(qx), qy) / w.meta_batch).backward()
