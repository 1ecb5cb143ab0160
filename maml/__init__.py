"""maml: MAML and its family in JAX + Equinox + Optax.

The meta-gradient module: an inner loop of differentiable SGD steps (`InnerLoop`), the per-task
objective (`meta_loss`), its gradient over a batch of tasks (`meta_value_and_grad`), and a pure
training step (`make_train_step`) for the caller to jit. Strategies (`SecondOrder`, `FirstOrder`, and
the rest of the family) and task batching (`Vmap`, `Map`, `Unroll`) are values passed in; `fit` runs
the step with hooks and checkpoints. Namespaces: `maml.nn` (models, layers, losses), `maml.curvature`
(curvature diagnostics), `maml.parallel` (several devices and hosts).
"""

from . import curvature, nn, parallel

# Tasks, the inner loop, the meta-objective and the training step
from .tasks import Task, check_batch
from .inner import AbstractLearnedRates, AbstractPerStepModel, Adaptation, InnerLoop, network
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
from .batching import AbstractBatching, Map, Unroll, Vmap, convolution_batching

# The MAML family
from .algorithms.base import AbstractStrategy
from .algorithms.order import AnnealedOrder, FirstOrder, SecondOrder
from .algorithms.multistep import MultiStepLoss, cosine_adam, msl_weights
from .algorithms.learned_rates import LearnedLR
from .algorithms.reptile import Reptile, reptile_sgd
from .algorithms.implicit import AbstractProximalSolver, GradientDescent, HessianFree, Implicit
from .algorithms.anil import head_filter

# Training: the loop and its hooks, checkpoints, loggers, errors
from .training.fit import Diverged, FitResult, Hook, Interrupted, StepInfo, Stop, fit, skipped_steps
from .training.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    Checkpointer,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    atomic_write_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    params_sha256,
    save_checkpoint,
)
from .training.loggers import AbstractLogger, ConsoleLogger, MultiLogger, WandbLogger

# The seed notebook's higher-order autodiff tools and the HVP modes
from .autodiff import (
    AbstractHVPMode,
    ForwardOverReverse,
    ReverseOverReverse,
    forward_mode_blocked,
    hessian,
    hvp,
    hvp_reverse,
    jacfwd,
    jacrev,
    straight_through,
    td0_loss,
)

__version__ = "0.2.0"

__all__ = sorted([
    # namespaces
    "curvature", "nn", "parallel",
    # tasks, inner loop, meta-objective, training step
    "Task", "check_batch",
    "AbstractLearnedRates", "AbstractPerStepModel", "Adaptation", "InnerLoop", "network",
    "MetaTrainState", "adaptation_curve", "init_state", "make_train_step", "meta_loss", "meta_loss_and_aux",
    "meta_value_and_grad", "scan_steps", "with_task_sampler",
    "AbstractBatching", "Map", "Unroll", "Vmap", "convolution_batching",
    # the MAML family
    "AbstractStrategy", "AnnealedOrder", "FirstOrder", "SecondOrder", "MultiStepLoss", "cosine_adam", "msl_weights",
    "LearnedLR", "Reptile", "reptile_sgd", "Implicit", "AbstractProximalSolver", "GradientDescent", "HessianFree",
    "head_filter",
    # training
    "Diverged", "FitResult", "Hook", "Interrupted", "StepInfo", "Stop", "fit", "skipped_steps",
    "CheckpointError", "CheckpointWriteError", "Checkpointer", "CorruptCheckpoint", "IncompatibleCheckpoint", "atomic_write_bytes",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "params_sha256", "save_checkpoint",
    "AbstractLogger", "ConsoleLogger", "MultiLogger", "WandbLogger",
    # autodiff
    "AbstractHVPMode", "ForwardOverReverse", "ReverseOverReverse", "forward_mode_blocked", "hessian", "hvp",
    "hvp_reverse", "jacfwd", "jacrev", "straight_through", "td0_loss",
])
