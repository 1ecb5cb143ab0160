"""Shared PyTorch pieces: the Conv4 / MLP modules with our parameters, losses, batches as tensors."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormBatchStats(nn.Module):
    """Batch norm with the batch's own statistics written as normalise-then-affine (right under vmap,
    where `nn.BatchNorm2d` gives a wrong second-order gradient: a known functorch issue)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def max_pool_amax(x, k=2):
    """2x2 max-pool as reshape + amax (its double backward is right under vmap; see torchfunc.py)."""
    n, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


class Conv4(nn.Module):
    """The MAML Conv4: 4 x (3x3 conv without bias, batch-statistics batch norm, ReLU, 2x2 max-pool), linear."""

    def __init__(self, classes: int, filters: int = 64, features: int = 64, bn: str = "module", channels: int = 1):
        super().__init__()
        self.pool = F.max_pool2d if bn == "module" else max_pool_amax
        convs, bns = [], []
        cin = channels
        for _ in range(4):
            convs.append(nn.Conv2d(cin, filters, 3, padding=1, bias=False))
            # "module": the nn.BatchNorm2d users write (higher, learn2learn); "manual": right under vmap.
            bns.append(nn.BatchNorm2d(filters, track_running_stats=False) if bn == "module" else BatchNormBatchStats(filters))
            cin = filters
        self.convs, self.bns = nn.ModuleList(convs), nn.ModuleList(bns)
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = self.pool(F.relu(bn(conv(x))), 2)
        return self.head(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, sizes=(1, 40, 40, 1)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):  # no slicing: higher's patched ModuleList cannot slice
            x = layer(x)
            x = F.relu(x) if i < last else x
        return x


def build(workload, params: dict[str, np.ndarray], dtype=torch.float32, bn: str = "module",
          device: str = "cpu") -> nn.Module:
    """The workload's torch model holding `params` (names as `benchmarks.ours.torch_params` gives), on `device`."""
    if workload.model == "conv4":
        model = Conv4(workload.ways, workload.filters, params["head.weight"].shape[1], bn=bn, channels=workload.channels)
    else:
        model = MLP()
    model = model.to(dtype)  # before loading: load_state_dict casts into the existing dtype
    state = {k: torch.as_tensor(np.ascontiguousarray(v)).to(dtype) for k, v in params.items()}
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"params: names {sorted(missing)} do not match the torch model")
    model.load_state_dict(state)
    return model.to(device)


def loss_fn(workload):
    return F.cross_entropy if workload.model == "conv4" else F.mse_loss


def tensors(workload, batch: dict[str, np.ndarray], dtype=torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The batch as torch tensors on `device`: images NCHW (per task `[B, S, C, H, W]`), labels int64."""
    out = {}
    for k, v in batch.items():
        if workload.model == "conv4" and k.endswith("_x"):
            out[k] = torch.as_tensor(np.ascontiguousarray(v.transpose(0, 1, 4, 2, 3))).to(dtype)
        elif workload.model == "conv4":
            out[k] = torch.as_tensor(v).long()
        else:
            out[k] = torch.as_tensor(v).to(dtype)
    return {k: v.to(device) for k, v in out.items()}


class TorchPeer:
    """Common parts: model, batch, Adam on `device`; subclasses define `accumulate_grads()`."""

    bn = "module"

    def __init__(self, workload, params, batch, dtype=torch.float32, device: str = "cpu"):
        # Tiny MLP steps are dominated by thread synchronisation: one thread is the peers' fastest there.
        torch.set_num_threads(1 if workload.model == "mlp" else (os.cpu_count() or 1))
        self.w = workload
        self.device = torch.device(device)
        self.model = build(workload, params, dtype, bn=self.bn, device=device)
        self.batch = tensors(workload, batch, dtype, device)
        self.loss = loss_fn(workload)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=workload.outer_lr)

    def tasks(self):
        b = self.batch
        for i in range(self.w.meta_batch):
            yield b["support_x"][i], b["support_y"][i], b["query_x"][i], b["query_y"][i]

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.accumulate_grads()
        self.opt.step()

    def sync(self):
        """Wait for the device's queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def meta_grad(self) -> dict[str, np.ndarray]:
        self.model.zero_grad(set_to_none=True)
        self.accumulate_grads()
        return {k: p.grad.detach().cpu().numpy().copy() for k, p in self.model.named_parameters()}
