"""higher: `innerloop_ctx` with a differentiable SGD inner optimiser, a loop over tasks, `.backward()` per task."""

from __future__ import annotations

import higher
import torch

from .common import TorchPeer


class Higher(TorchPeer):
    def __init__(self, workload, params, batch, dtype=torch.float32, device="cpu"):
        if not workload.second_order:
            raise NotImplementedError("higher: first-order MAML is not its form (track_higher_grads=False "
                                      "detaches the adapted weights from the initial ones)")
        super().__init__(workload, params, batch, dtype, device)
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=workload.inner_lr)

    def accumulate_grads(self):
        w, loss = self.w, self.loss
        for sx, sy, qx, qy in self.tasks():
            with higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w.steps):
                    diffopt.step(loss(fmodel(sx), sy))
                (loss(fmodel(qx), qy) / w.meta_batch).backward()
