"""learn2learn: `MAML(model, lr, first_order)`, `clone()` and `adapt()` per task, `.backward()` per task."""

from __future__ import annotations

import glob
import importlib.util
import os

import torch


def _torchvision_ops() -> object:
    """`import learn2learn` imports torchvision, whose only wheel for torch 2.13 here is a CUDA build whose
    compiled ops do not load against the CPU torch; its import then dies registering fake kernels for
    `torchvision::nms` / `qnms`. Nothing in a MAML step uses them: where the library does not load, declare
    the two schemas so that the import succeeds (the returned library must stay alive)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return None
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_OPS = _torchvision_ops()

import learn2learn as l2l  # noqa: E402  (after the schemas above)

from .common import TorchPeer  # noqa: E402


class L2L(TorchPeer):
    def __init__(self, workload, params, batch, dtype=torch.float32, device="cpu"):
        super().__init__(workload, params, batch, dtype, device)
        self.maml = l2l.algorithms.MAML(self.model, lr=workload.inner_lr, first_order=not workload.second_order)

    def accumulate_grads(self):
        w, loss = self.w, self.loss
        for sx, sy, qx, qy in self.tasks():
            learner = self.maml.clone()
            for _ in range(w.steps):
                learner.adapt(loss(learner(sx), sy))
            (loss(learner(qx), qy) / w.meta_batch).backward()
