"""Equinox models, their fast layers and the task losses.

- `MLP` (the sinusoid network), `Conv4` (Omniglot / mini-ImageNet, any image size and channels);
- `ResNet12`: MetaOptNet's ResNet-12 (batch statistics, global average pooling, no DropBlock);
- `PerStep`: per-inner-step parameters of any network (MAML++ per-step batch norm);
- `AbstractBatchModel` / `apply`: per-example models are vmapped, batch models take the whole batch;
- layers: `Im2Col`, `Winograd`, `LaxConv`, `OneDNN` (3x3 convolutions as values; `onednn_available()`), `max_pool_2x2`, `batch_norm`;
- losses `loss_fn(model, x, y)`: `mse`, `cross_entropy`, and the metric `accuracy`.
"""

from .base import AbstractBatchModel, apply
from .conv4 import Conv4, default_convs
from .layers import AbstractConv3x3, Im2Col, LaxConv, Winograd, batch_norm, im2col_3x3, max_pool_2x2
from .losses import accuracy, cross_entropy, mse
from .mlp import MLP
from .onednn import OneDNN
from .onednn import available as onednn_available
from .per_step import PerStep, norm_params
from .resnet12 import ResNet12

__all__ = [
    # models
    "AbstractBatchModel", "Conv4", "MLP", "default_convs", "PerStep", "ResNet12", "apply", "norm_params",
    # layers
    "AbstractConv3x3", "Im2Col", "LaxConv", "OneDNN", "Winograd", "batch_norm", "im2col_3x3", "max_pool_2x2",
    "onednn_available",
    # losses
    "accuracy", "cross_entropy", "mse",
]
