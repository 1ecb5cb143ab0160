"""torch.func: `functional_call` + `grad` for the inner step, `vmap` over tasks (TorchFuncVmap) or a Python
loop over tasks (TorchFuncLoop), the strongest modern PyTorch forms of MAML."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .common import TorchPeer


class _TorchFunc(TorchPeer):
    bn = "manual"  # nn.BatchNorm2d under vmap gives a wrong second-order gradient

    def task_loss(self, params, sx, sy, qx, qy):
        model, loss, w = self.model, self.loss, self.w
        for _ in range(w.steps):
            g = grad(lambda p: loss(functional_call(model, p, (sx,)), sy))(params)
            if not w.second_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - w.inner_lr * g[k] for k in params}
        return loss(functional_call(model, params, (qx,)), qy)

    def params(self):
        return dict(self.model.named_parameters())


class TorchFuncVmap(_TorchFunc):
    """`vmap` of the per-task loss over the task batch, `grad` of the mean."""

    def accumulate_grads(self):
        params, b = self.params(), self.batch
        detached = {k: v.detach() for k, v in params.items()}
        mean = lambda p: vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0), randomness="same")(
            p, b["support_x"], b["support_y"], b["query_x"], b["query_y"]).mean()
        grads = grad(mean)(detached)
        for k, p in params.items():
            p.grad = grads[k]


class TorchFuncLoop(_TorchFunc):
    """A Python loop over tasks of `grad` of each task's loss, summed into `.grad`. Without vmap, the
    `nn.BatchNorm2d` and `F.max_pool2d` users write are right to second order (checked against ours), and
    faster than the vmap-safe forms."""

    bn = "module"

    def accumulate_grads(self):
        params = self.params()
        detached = {k: v.detach() for k, v in params.items()}
        total = None
        for task in self.tasks():
            g = grad(self.task_loss)(detached, *task)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        for k, p in params.items():
            p.grad = total[k] / self.w.meta_batch
