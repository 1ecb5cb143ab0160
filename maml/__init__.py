"""maml: MAML and its family in JAX + Equinox + Optax.

The meta-gradient module: an inner loop of differentiable SGD steps (`InnerLoop`), the per-task
objective (`meta_loss`), its gradient over a batch of tasks (`meta_value_and_grad`), and a pure
training step (`make_train_step`) for the caller to jit. Strategies (`SecondOrder`, `FirstOrder`) and
task batching (`Vmap`, `Map`, `Unroll`) are values passed in.
"""

from . import losses
from .autodiff import hessian, hvp, hvp_reverse, jacfwd, jacrev, straight_through, td0_loss
from .batching import AbstractBatching, Map, Unroll, Vmap
from .checkpoint import latest_checkpoint, load_checkpoint, params_sha256, save_checkpoint
from .inner import InnerLoop
from .meta import (
    MetaTrainState,
    init_state,
    make_train_step,
    meta_loss,
    meta_loss_and_aux,
    meta_value_and_grad,
    scan_steps,
    with_task_sampler,
)
from .models import MLP, AbstractBatchModel, apply
from .strategies import AbstractStrategy, FirstOrder, SecondOrder
from .tasks import Task, check_batch
from .training import fit

__version__ = "0.1.0"

__all__ = [
    "AbstractBatchModel",
    "AbstractBatching",
    "AbstractStrategy",
    "FirstOrder",
    "InnerLoop",
    "MLP",
    "Map",
    "MetaTrainState",
    "SecondOrder",
    "Task",
    "Unroll",
    "Vmap",
    "apply",
    "check_batch",
    "fit",
    "hessian",
    "hvp",
    "hvp_reverse",
    "init_state",
    "jacfwd",
    "jacrev",
    "latest_checkpoint",
    "load_checkpoint",
    "losses",
    "make_train_step",
    "meta_loss",
    "meta_loss_and_aux",
    "meta_value_and_grad",
    "params_sha256",
    "save_checkpoint",
    "scan_steps",
    "straight_through",
    "td0_loss",
    "with_task_sampler",
]
