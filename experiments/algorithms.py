"""The MAML family for the experiments: one frozen config dataclass per algorithm, each building the
pieces the library takes (model wrapper, inner loop, strategy, outer optimiser) with `build`.

An experiment offers its algorithms as a registry of default values (`registry(MAML(...), Reptile(...))`),
chosen by `--algorithm NAME`; its options are flags (see experiments/cli.py): options shared through a base
class are plain (`--inner-steps`, `--first-order`), an algorithm's own carry its name (`--reptile-step-size`).
The training loop is the same for all of them (`maml.make_train_step`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import equinox as eqx
import optax

import maml
from experiments.config import NON_NEGATIVE, POSITIVE, Checked, FlagError, at_least, flag


class Algorithm(NamedTuple):
    """What `AlgorithmConfig.build` returns: meta-learn `model` with
    `maml.make_train_step(optimizer, inner, strategy=strategy)`."""

    model: Any
    inner: maml.InnerLoop
    strategy: maml.AbstractStrategy
    optimizer: optax.GradientTransformation


@dataclass(frozen=True)
class AlgorithmConfig(Checked, abc.ABC):
    """Options every algorithm has."""

    name: ClassVar[str]
    inner_steps: int = flag(1, "inner SGD steps in meta-training", rule=at_least(1))
    inner_lr: float = flag(0.01, "inner SGD learning rate", rule=POSITIVE)

    def key(self, field: str) -> str:
        """The flat key of one of this config's fields (own fields carry the algorithm's name)."""
        own = vars(type(self)).get("__annotations__", {})
        return f"{self.name}_{field.rstrip('_')}" if field in own else field

    @abc.abstractmethod
    def build(self, model: Any, loss_fn: Callable, *, iterations: int) -> Algorithm:
        """The model (wrapped as the algorithm needs), inner loop, strategy and outer optimiser; `iterations`
        is the run's meta-iteration count (for schedules)."""


def registry(*defaults: AlgorithmConfig) -> dict[str, AlgorithmConfig]:
    """An experiment's algorithms by name (the first is the default)."""
    return {d.name: d for d in defaults}


@dataclass(frozen=True)
class AdamOuter(AlgorithmConfig):
    """Options of the algorithms whose outer update is Adam on a meta-gradient."""

    outer_lr: float = flag(1e-3, "Adam learning rate of the outer (meta) update", rule=POSITIVE)


@dataclass(frozen=True)
class Differentiated(AdamOuter):
    """Options of the algorithms that differentiate through the inner loop."""

    first_order: bool = flag(False, "first order: no second derivatives through the inner loop")
    inner_checkpoint: int = flag(0, "remat the inner loop in segments of N steps (0: off; memory-bounded 2nd order)",
                                 rule=at_least(0))

    def __post_init__(self):
        super().__post_init__()
        if self.inner_checkpoint and self.first_order:
            raise FlagError("--inner-checkpoint", f"--inner-checkpoint={self.inner_checkpoint} with --first-order: "
                            "only second order keeps the inner loop for the backward pass; use 0")

    def order(self) -> maml.AbstractStrategy:
        return maml.FirstOrder() if self.first_order else maml.SecondOrder()

    def inner(self, loss_fn: Callable, adapt_filter: Any = eqx.is_inexact_array) -> maml.InnerLoop:
        return maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr, adapt_filter,
                              checkpoint_every=self.inner_checkpoint)


@dataclass(frozen=True)
class MAML(Differentiated):
    """MAML (Finn et al. 2017): the query loss after the inner SGD steps, differentiated through them."""

    name: ClassVar[str] = "maml"

    def build(self, model, loss_fn, *, iterations):
        return Algorithm(model, self.inner(loss_fn), self.order(), optax.adam(self.outer_lr))


@dataclass(frozen=True)
class FOMAML(AdamOuter):
    """First-order MAML (Finn et al. 2017): the inner gradients are constants to the outer gradient."""

    name: ClassVar[str] = "fomaml"

    def build(self, model, loss_fn, *, iterations):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        return Algorithm(model, inner, maml.FirstOrder(), optax.adam(self.outer_lr))


@dataclass(frozen=True)
class ANIL(Differentiated):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop."""

    name: ClassVar[str] = "anil"

    def build(self, model, loss_fn, *, iterations):
        return Algorithm(model, self.inner(loss_fn, maml.head_filter(model)), self.order(), optax.adam(self.outer_lr))


@dataclass(frozen=True)
class MetaSGD(Differentiated):
    """Meta-SGD (Li et al. 2017): one meta-learned inner rate per parameter."""

    name: ClassVar[str] = "metasgd"
    init_lr: float = flag(0.0, "initial per-parameter inner rate (0: the inner lr)", rule=NON_NEGATIVE)

    def build(self, model, loss_fn, *, iterations):
        wrapped = maml.LearnedLR.per_parameter(model, self.init_lr or self.inner_lr)
        return Algorithm(wrapped, self.inner(loss_fn), self.order(), optax.adam(self.outer_lr))


@dataclass(frozen=True)
class MAMLPlusPlus(Differentiated):
    """MAML++ (Antoniou et al. 2019): each of its tricks is a switch."""

    name: ClassVar[str] = "mamlpp"
    msl: bool = flag(True, "multi-step loss with annealed weights")
    msl_iterations: int = flag(5000, "meta-iterations over which the multi-step weights anneal", rule=at_least(1))
    lslr: bool = flag(True, "learned per-layer per-step inner rates")
    per_step_bn: bool = flag(False, "per-step batch norm (models with batch norm: maml.nn.PerStep)")
    first_order_iterations: int = flag(0, "derivative-order annealing: first order for N meta-iterations",
                                       rule=at_least(0))
    cosine: bool = flag(True, "cosine annealing of the outer rate over the run's iterations")
    min_lr: float = flag(1e-5, "final outer rate of the cosine schedule", rule=POSITIVE)

    def build(self, model, loss_fn, *, iterations):
        if self.per_step_bn:
            if not hasattr(model, "norm_params"):
                raise FlagError("--mamlpp-per-step-bn", f"--mamlpp-per-step-bn with a {type(model).__name__}: the "
                                "model has no batch norm (expected a model with norm_params, e.g. maml.nn.Conv4)")
            model = maml.nn.PerStep(model, self.inner_steps)
        strategy = self.order()
        if self.first_order_iterations and not self.first_order:
            strategy = maml.AnnealedOrder(self.first_order_iterations)
        if self.msl:
            strategy = maml.MultiStepLoss(strategy, self.msl_iterations)
        if self.lslr:
            model = maml.LearnedLR.per_layer(model, self.inner_lr, steps=self.inner_steps)
        min_lr = min(self.min_lr, self.outer_lr)
        optimizer = maml.cosine_adam(self.outer_lr, iterations, min_lr) if self.cosine else optax.adam(self.outer_lr)
        return Algorithm(model, self.inner(loss_fn), strategy, optimizer)


@dataclass(frozen=True)
class Reptile(AlgorithmConfig):
    """Reptile (Nichol et al. 2018): move the initialisation towards the adapted parameters."""

    name: ClassVar[str] = "reptile"
    step_size: float = flag(1.0, "outer step size, annealed linearly to 0 over the run's iterations", rule=POSITIVE)

    def build(self, model, loss_fn, *, iterations):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        return Algorithm(model, inner, maml.Reptile(), maml.reptile_sgd(self.step_size, 0.0, iterations))


@dataclass(frozen=True)
class IMAML(AdamOuter):
    """iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of a proximal inner problem."""

    name: ClassVar[str] = "imaml"
    lambda_: float = flag(2.0, "proximal strength lam (below -min eig(H), I + H/lam is indefinite: CG degrades)",
                          rule=POSITIVE)
    cg_steps: int = flag(5, "conjugate-gradient iterations", rule=at_least(1))

    def build(self, model, loss_fn, *, iterations):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        return Algorithm(model, inner, maml.Implicit(self.lambda_, self.cg_steps), optax.adam(self.outer_lr))


def with_skipping(algo: Algorithm, max_consecutive: int) -> Algorithm:
    """The algorithm with its outer optimiser skipping up to `max_consecutive` non-finite steps in a row
    (`optax.apply_if_finite`; `maml.fit` then skips them instead of stopping); unchanged for 0."""
    if not max_consecutive:
        return algo
    return algo._replace(optimizer=optax.apply_if_finite(algo.optimizer, max_consecutive))


ALL = (MAML, FOMAML, ANIL, MetaSGD, MAMLPlusPlus, Reptile, IMAML)
"""Every algorithm config class, in the order experiments list them."""
NAMES = tuple(c.name for c in ALL)
