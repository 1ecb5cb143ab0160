"""The MAML family for the experiments: one frozen config dataclass per algorithm, each building the
pieces the library takes (model wrapper, inner loop, strategy, outer optimiser, and how it adapts at
evaluation) with `build`.

An experiment offers its algorithms as a registry of default values (`registry(MAML(...), Reptile(...))`),
each holding that algorithm's paper settings for the experiment, chosen by `--algorithm NAME`; every field is
a flag (see experiments/config_tree.py): fields shared through a base class are plain (`--inner-steps`,
`--first-order`), an algorithm's own carry its name (`--reptile-step-size`). Schedules are defined by their
own fields (`--reptile-anneal-iterations`, `--mamlpp-cosine-iterations`), never by the run's `--iterations`,
so a resumed run with a larger budget keeps the schedule of the steps already taken.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import optax

import maml
from experiments.config import NON_NEGATIVE, POSITIVE, Checked, FlagError, Rule, at_least, flag, one_of

STEP_COUNTS = Rule(lambda v: bool(v) and min(v) >= 0, "non-negative step counts")


class Algorithm(NamedTuple):
    """What `AlgorithmConfig.build` returns: meta-learn `model` with
    `maml.make_train_step(optimizer, inner, strategy=strategy)`; adapt at evaluation as `evaluation` does."""

    model: Any
    inner: maml.InnerLoop
    strategy: maml.AbstractStrategy
    optimizer: optax.GradientTransformation
    evaluation: maml.AbstractStrategy


@dataclass(frozen=True)
class AlgorithmConfig(Checked, abc.ABC):
    """Options every algorithm has."""

    name: ClassVar[str]
    inner_steps: int = flag(1, "inner SGD steps in meta-training", rule=at_least(1))
    eval_steps: tuple[int, ...] = flag((0, 1, 5, 10), "inner steps at which evaluation reports (0: before adapting)",
                                       rule=STEP_COUNTS, resumable=True)

    def key(self, field: str) -> str:
        """The flat key of one of this config's fields (own fields carry the algorithm's name)."""
        own = vars(type(self)).get("__annotations__", {})
        return f"{self.name}_{field.rstrip('_')}" if field in own else field

    @abc.abstractmethod
    def build(self, model: Any, loss_fn: Callable, *, key: jax.Array) -> Algorithm:
        """The model (wrapped as the algorithm needs; `key` for random initialisations), inner loop, strategy,
        outer optimiser and evaluation strategy."""

    @abc.abstractmethod
    def rate_bound(self, model: Any) -> Optional[float]:
        """A bound on the rates of evaluation's SGD steps: with it, `rate_bound * lambda_max(support-loss
        Hessian)` is the inner loop's stability figure (above 2 the first step diverges on a quadratic model);
        None where evaluation does not take SGD steps."""

    def reused_rates(self, steps: int) -> Optional[str]:
        """What adapting for `steps` steps reuses of rates learned for fewer steps (None: nothing)."""
        return None


def registry(*defaults: AlgorithmConfig) -> dict[str, AlgorithmConfig]:
    """An experiment's algorithms by name (the first is the default)."""
    return {d.name: d for d in defaults}


@dataclass(frozen=True)
class FixedRate(AlgorithmConfig):
    """Options of the algorithms whose inner loop has a rate of its own (all but Meta-SGD, whose rates are learned)."""

    inner_lr: float = flag(0.01, "inner SGD learning rate", rule=POSITIVE)

    def rate_bound(self, model):
        return self.inner_lr


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
        return maml.InnerLoop(loss_fn, self.inner_steps, getattr(self, "inner_lr", None), adapt_filter,
                              checkpoint_every=self.inner_checkpoint)

    def plain(self, model, inner, strategy) -> Algorithm:
        return Algorithm(model, inner, strategy, optax.adam(self.outer_lr), strategy)


@dataclass(frozen=True)
class MAML(Differentiated, FixedRate):
    """MAML (Finn et al. 2017): the query loss after the inner SGD steps, differentiated through them."""

    name: ClassVar[str] = "maml"

    def build(self, model, loss_fn, *, key):
        return self.plain(model, self.inner(loss_fn), self.order())


@dataclass(frozen=True)
class FOMAML(AdamOuter, FixedRate):
    """First-order MAML (Finn et al. 2017): the inner gradients are constants to the outer gradient."""

    name: ClassVar[str] = "fomaml"

    def build(self, model, loss_fn, *, key):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        return Algorithm(model, inner, maml.FirstOrder(), optax.adam(self.outer_lr), maml.FirstOrder())


@dataclass(frozen=True)
class ANIL(Differentiated, FixedRate):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop (MAML's settings otherwise)."""

    name: ClassVar[str] = "anil"

    def build(self, model, loss_fn, *, key):
        return self.plain(model, self.inner(loss_fn, maml.head_filter(model)), self.order())


@dataclass(frozen=True)
class MetaSGD(Differentiated):
    """Meta-SGD (Li et al. 2017): one meta-learned inner rate per parameter, trained for one step."""

    name: ClassVar[str] = "metasgd"
    init_low: float = flag(0.005, "rates start uniform in [low, high] (Li et al. 2017, sec. 4.1: [0.005, 0.1])",
                           rule=POSITIVE)
    init_high: float = flag(0.1, "upper end of the rates' initial range", rule=POSITIVE)

    def build(self, model, loss_fn, *, key):
        wrapped = maml.LearnedLR.per_parameter_uniform(model, self.init_low, self.init_high, key=key)
        return self.plain(wrapped, self.inner(loss_fn), self.order())

    def rate_bound(self, model):
        return float(model.largest_rate())

    def reused_rates(self, steps):
        if steps <= self.inner_steps:
            return None
        return (f"the per-parameter rates were meta-learned for {self.inner_steps} step(s); steps "
                f"{self.inner_steps + 1}..{steps} apply the same rates again")


@dataclass(frozen=True)
class MAMLPlusPlus(Differentiated, FixedRate):
    """MAML++ (Antoniou et al. 2019; defaults from its released Omniglot configs): each trick a switch."""

    name: ClassVar[str] = "mamlpp"
    msl: bool = flag(True, "multi-step loss with annealed weights")
    msl_iterations: int = flag(5000, "meta-iterations over which the multi-step weights anneal (the release: 10 "
                                     "epochs of 500)", rule=at_least(1))
    msl_min_weight: float = flag(0.01, "final weight x K of each non-final step's loss (the release's "
                                       "minimum_per_task_contribution)", rule=NON_NEGATIVE)
    lslr: bool = flag(True, "learned per-layer per-step inner rates, starting at --inner-lr")
    per_step_bn: bool = flag(False, "per-step batch norm (models with batch norm: maml.nn.PerStep)")
    first_order_iterations: int = flag(0, "derivative-order annealing: first order for N meta-iterations (the "
                                          "release: 0, second order throughout)", rule=at_least(0))
    cosine: bool = flag(True, "cosine annealing of the outer rate")
    cosine_iterations: int = flag(50_000, "meta-iterations of the cosine schedule (the release: 100 epochs of 500)",
                                  rule=at_least(1))
    min_lr: float = flag(1e-5, "final outer rate of the cosine schedule", rule=POSITIVE)

    def build(self, model, loss_fn, *, key):
        if self.per_step_bn:
            if not hasattr(model, "norm_params"):
                raise FlagError("--mamlpp-per-step-bn", f"--mamlpp-per-step-bn with a {type(model).__name__}: the "
                                "model has no batch norm (expected a model with norm_params, e.g. maml.nn.Conv4)")
            model = maml.nn.PerStep(model, self.inner_steps)
        strategy = self.order()
        if self.first_order_iterations and not self.first_order:
            strategy = maml.AnnealedOrder(self.first_order_iterations)
        if self.msl:
            strategy = maml.MultiStepLoss(strategy, self.msl_iterations, self.msl_min_weight)
        if self.lslr:
            model = maml.LearnedLR.per_layer(model, self.inner_lr, steps=self.inner_steps)
        optimizer = maml.cosine_adam(self.outer_lr, self.cosine_iterations, min(self.min_lr, self.outer_lr)) \
            if self.cosine else optax.adam(self.outer_lr)
        return Algorithm(model, self.inner(loss_fn), strategy, optimizer, strategy)

    def rate_bound(self, model):
        return float(model.largest_rate(0)) if isinstance(model, maml.LearnedLR) else self.inner_lr

    def reused_rates(self, steps):
        rows = [what for what, on in (("learned rates", self.lslr), ("batch-norm rows", self.per_step_bn)) if on]
        if steps <= self.inner_steps or not rows:
            return None
        return (f"{' and '.join(rows)} exist for {self.inner_steps} steps; steps {self.inner_steps + 1}..{steps} "
                f"reuse those of step {self.inner_steps}")


@dataclass(frozen=True)
class Reptile(FixedRate):
    """Reptile (Nichol et al. 2018): move the initialisation towards the adapted parameters."""

    name: ClassVar[str] = "reptile"
    step_size: float = flag(0.1, "outer step size at the start (the sine demo: 0.1)", rule=POSITIVE)
    final_step_size: float = flag(0.0, "outer step size at the end of the annealing", rule=NON_NEGATIVE)
    anneal_iterations: int = flag(30_000, "meta-iterations of the linear annealing (the sine demo: 30,000)",
                                  rule=at_least(1))

    def build(self, model, loss_fn, *, key):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        optimizer = maml.reptile_sgd(self.step_size, self.final_step_size, self.anneal_iterations)
        return Algorithm(model, inner, maml.Reptile(), optimizer, maml.FirstOrder())


def _evaluate_like_release(strategy: maml.Implicit) -> maml.AbstractStrategy:
    """Plain SGD without the proximal term, as the release's `measure_accuracy` (lambda 0)."""
    return maml.FirstOrder()


def _evaluate_as_trained(strategy: maml.Implicit) -> maml.AbstractStrategy:
    return strategy


class InnerSolver(NamedTuple):
    """An iMAML inner solver (built from the CG step count), the strategy evaluation adapts with, and whether
    evaluation takes SGD steps of --inner-lr (then `rate x lambda_max` is its stability figure)."""

    solver: Callable[[int], maml.AbstractProximalSolver]
    evaluation: Callable[[maml.Implicit], maml.AbstractStrategy]
    sgd_steps: bool


IMAML_SOLVERS = {
    "gd": InnerSolver(lambda cg_steps: maml.GradientDescent(), _evaluate_like_release, True),
    "hf": InnerSolver(maml.HessianFree, _evaluate_as_trained, False),
}


@dataclass(frozen=True)
class IMAML(AdamOuter, FixedRate):
    """iMAML (Rajeswaran et al. 2019; defaults from its released code): the implicit meta-gradient of a
    proximal inner problem. `gd` evaluation adapts by plain SGD, as the release measures accuracy (lambda 0);
    `hf` evaluation adapts as it trains (Newton-CG on the proximal problem)."""

    name: ClassVar[str] = "imaml"
    solver: str = flag("gd", "inner solver: gd (SGD steps of --inner-lr, the paper's iMAML-GD) or hf (Newton-CG "
                       "steps of size --inner-lr, its iMAML-HF)", rule=one_of(IMAML_SOLVERS))
    lambda_: float = flag(2.0, "proximal strength lam (below -min eig(H), I + H/lam is indefinite: CG degrades)",
                          rule=POSITIVE)
    cg_steps: int = flag(5, "conjugate-gradient iterations of each linear solve (the meta-gradient's and, with "
                         "hf, each Newton step's)", rule=at_least(1))
    cg_damping: float = flag(1.0, "c in the release's CG system (1 + c) I + H / (lam + d) (0 and d 0: exact "
                             "I + H / lam)", rule=NON_NEGATIVE)
    lam_damping: float = flag(10.0, "d in the release's CG system (added to lam in the Hessian term only)",
                              rule=NON_NEGATIVE)

    def build(self, model, loss_fn, *, key):
        inner = maml.InnerLoop(loss_fn, self.inner_steps, self.inner_lr)
        solver, evaluation, _ = IMAML_SOLVERS[self.solver]
        strategy = maml.Implicit(self.lambda_, self.cg_steps, cg_damping=self.cg_damping,
                                 lam_damping=self.lam_damping, solver=solver(self.cg_steps))
        return Algorithm(model, inner, strategy, optax.adam(self.outer_lr), evaluation(strategy))

    def rate_bound(self, model):
        return self.inner_lr if IMAML_SOLVERS[self.solver].sgd_steps else None  # Newton steps: no such figure


def with_skipping(algo: Algorithm, max_consecutive: int) -> Algorithm:
    """The algorithm with its outer optimiser skipping up to `max_consecutive` non-finite steps in a row
    (`optax.apply_if_finite`; `maml.fit` then skips them instead of stopping); unchanged for 0."""
    if not max_consecutive:
        return algo
    return algo._replace(optimizer=optax.apply_if_finite(algo.optimizer, max_consecutive))


ALL = (MAML, FOMAML, ANIL, MetaSGD, MAMLPlusPlus, Reptile, IMAML)
"""Every algorithm config class, in the order experiments list them."""
NAMES = tuple(c.name for c in ALL)
