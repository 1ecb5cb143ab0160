"""maml: MAML and its family in JAX + Equinox + Optax.

The meta-gradient module: an inner loop of differentiable SGD steps (`InnerLoop`), the per-task
objective (`meta_loss`), its gradient over a batch of tasks (`meta_value_and_grad`), and a pure
training step (`make_train_step`) for the caller to jit. Strategies (`SecondOrder`, `FirstOrder`) and
task batching (`Vmap`, `Map`, `Unroll`) are values passed in.
"""

from . import curvature, lanczos, losses, task_curvature
from .autodiff import hessian, hvp, hvp_reverse, jacfwd, jacrev, straight_through, td0_loss
from .batching import AbstractBatching, Map, Unroll, Vmap
from .checkpoint import latest_checkpoint, load_checkpoint, params_sha256, save_checkpoint
from .family import AnnealedOrder, MultiStepLoss, Reptile, cosine_adam, head_filter, msl_weights, reptile_sgd
from .implicit import Implicit
from .inner import AbstractPerStepModel, InnerLoop, LearnedLR, network
from .meta import (
    MetaTrainState,
    adaptation_curve,
    init_state,
    make_train_step,
    meta_loss,
    meta_loss_and_aux,
    meta_value_and_grad,
    scan_steps,
    with_task_sampler,
)
from . import layers
from . import parallel
from .models import MLP, AbstractBatchModel, Conv4, PerStepConv4, apply
from .strategies import AbstractStrategy, Adaptation, FirstOrder, SecondOrder
from .tasks import Task, check_batch
from .training import fit
from . import logging
from .logging import AbstractLogger, ConsoleLogger, MultiLogger, WandbLogger, read_offline_run

__version__ = "0.1.0"

__all__ = [
    "AbstractLogger",
    "AbstractPerStepModel",
    "Adaptation",
    "AnnealedOrder",
    "Implicit",
    "LearnedLR",
    "MultiStepLoss",
    "Reptile",
    "adaptation_curve",
    "cosine_adam",
    "head_filter",
    "msl_weights",
    "network",
    "reptile_sgd",
    "AbstractBatchModel",
    "AbstractBatching",
    "AbstractStrategy",
    "Conv4",
    "PerStepConv4",
    "ConsoleLogger",
    "FirstOrder",
    "InnerLoop",
    "MLP",
    "MultiLogger",
    "Map",
    "MetaTrainState",
    "SecondOrder",
    "Task",
    "WandbLogger",
    "Unroll",
    "Vmap",
    "apply",
    "check_batch",
    "curvature",
    "fit",
    "logging",
    "hessian",
    "hvp",
    "hvp_reverse",
    "init_state",
    "jacfwd",
    "jacrev",
    "latest_checkpoint",
    "load_checkpoint",
    "layers",
    "losses",
    "make_train_step",
    "meta_loss",
    "meta_loss_and_aux",
    "meta_value_and_grad",
    "parallel",
    "params_sha256",
    "read_offline_run",
    "save_checkpoint",
    "scan_steps",
    "straight_through",
    "task_curvature",
    "td0_loss",
    "with_task_sampler",
]
