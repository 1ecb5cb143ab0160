"""`--algorithm {maml,fomaml,anil,metasgd,mamlpp,reptile,imaml}` for every experiment: a config mixin and
one function turning it into the pieces the library takes (model wrapper, inner loop, strategy, outer
optimiser). The training loop is the same for all of them (`maml.make_train_step`).

    @dataclass(frozen=True)
    class MyConfig(AlgorithmConfig): ...          # adds --algorithm and each algorithm's options
    algo = build_algorithm(config, model, loss_fn, inner_steps=..., inner_lr=..., outer_lr=..., iterations=...)
    step = maml.make_train_step(algo.optimizer, algo.inner, strategy=algo.strategy)  # on algo.model
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import optax

import maml
from experiments import cli

ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml")


_f = cli.flag


@dataclass(frozen=True)
class AlgorithmConfig:
    """Mixin: the meta-learning algorithm and its options (options of other algorithms are ignored)."""

    algorithm: str = _f("maml", "one of " + ", ".join(ALGORITHMS))
    inner_checkpoint: int = _f(0, "remat the inner loop in segments of N steps (0: off; memory-bounded 2nd order)")
    metasgd_init_lr: float = _f(0.0, "metasgd: initial per-parameter inner rate (0: the inner lr)")
    mamlpp_msl: bool = _f(True, "mamlpp: multi-step loss with annealed weights")
    mamlpp_msl_iterations: int = _f(5000, "mamlpp: meta-iterations over which the multi-step weights anneal")
    mamlpp_lslr: bool = _f(True, "mamlpp: learned per-layer per-step inner rates")
    mamlpp_per_step_bn: bool = _f(False, "mamlpp: per-step batch norm (the model must be a maml.AbstractPerStepModel)")
    mamlpp_first_order_iterations: int = _f(0, "mamlpp: derivative-order annealing, first order for N meta-iterations")
    mamlpp_cosine: bool = _f(True, "mamlpp: cosine annealing of the outer rate")
    mamlpp_min_lr: float = _f(1e-5, "mamlpp: final outer rate of the cosine schedule")
    reptile_step_size: float = _f(1.0, "reptile: outer step size, annealed linearly to 0 over the iterations")
    imaml_lambda: float = _f(2.0, "imaml: proximal strength lam (below -min eig(H), I + H/lam is indefinite: CG degrades)")
    imaml_cg_steps: int = _f(5, "imaml: conjugate-gradient iterations")
    skip_nonfinite: int = _f(0, "skip meta-steps with a NaN/inf meta-loss or meta-gradient, up to N in a row "
                                "(optax.apply_if_finite; counted in results.json); 0: stop the run at the first")

    def __post_init__(self):
        check_algorithm(self)
        parent = getattr(super(), "__post_init__", None)  # cooperate with other config mixins
        if parent is not None:
            parent()


def check_algorithm(config: AlgorithmConfig) -> None:
    """ValueError naming the first bad algorithm option (a config's own `__post_init__` may call this)."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm={config.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    for name, low in (("inner_checkpoint", 0), ("mamlpp_msl_iterations", 1), ("mamlpp_first_order_iterations", 0),
                      ("imaml_cg_steps", 1), ("skip_nonfinite", 0)):
        value = getattr(config, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value!r}; expected an integer >= {low}")
    for name in ("reptile_step_size", "imaml_lambda", "mamlpp_min_lr"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(config, name)!r}; expected a positive number")
    if config.metasgd_init_lr < 0:
        raise ValueError(f"--metasgd-init-lr={config.metasgd_init_lr!r}; expected >= 0 (0: the inner lr)")


class Algorithm(NamedTuple):
    """What `build_algorithm` returns: meta-learn `model` with `make_train_step(optimizer, inner, strategy=...)`."""

    model: Any
    inner: maml.InnerLoop
    strategy: maml.AbstractStrategy
    optimizer: optax.GradientTransformation


def build_algorithm(
    config: AlgorithmConfig,
    model: Any,
    loss_fn: Callable,
    *,
    inner_steps: int,
    inner_lr: float,
    outer_lr: float,
    iterations: int,
    first_order: bool = False,
) -> Algorithm:
    """The model (wrapped for learned rates), inner loop, strategy and outer optimiser of `config.algorithm`.

    `first_order` (an experiment's `--first-order`) turns maml into fomaml and mamlpp's order to first.
    With `--skip-nonfinite N` the optimiser is wrapped in `optax.apply_if_finite` (train with
    `maml.fit(..., skip_nonfinite=True)`).
    """
    algo = _build(config, model, loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr,
                  iterations=iterations, first_order=first_order)
    if config.skip_nonfinite:
        return algo._replace(optimizer=optax.apply_if_finite(algo.optimizer, config.skip_nonfinite))
    return algo


def _build(config, model, loss_fn, *, inner_steps, inner_lr, outer_lr, iterations, first_order) -> Algorithm:
    check_algorithm(config)
    a, adam = config.algorithm, optax.adam(outer_lr)
    inner = maml.InnerLoop(loss_fn, inner_steps, inner_lr, checkpoint_every=config.inner_checkpoint)
    order = maml.FirstOrder() if first_order else maml.SecondOrder()
    if config.inner_checkpoint and a in ("fomaml", "reptile", "imaml"):
        raise ValueError(f"--inner-checkpoint={config.inner_checkpoint} with --algorithm={a}: only second-order "
                         "algorithms keep the inner loop for the backward pass; use 0")
    if first_order and a in ("reptile", "imaml"):
        raise ValueError(f"--first-order with --algorithm={a}: {a} never differentiates the inner loop; drop the flag")
    if a in ("maml", "fomaml"):
        return Algorithm(model, inner, maml.FirstOrder() if a == "fomaml" else order, adam)
    if a == "anil":
        inner = maml.InnerLoop(loss_fn, inner_steps, inner_lr, maml.head_filter(model), config.inner_checkpoint)
        return Algorithm(model, inner, order, adam)
    if a == "metasgd":
        wrapped = maml.LearnedLR.per_parameter(model, config.metasgd_init_lr or inner_lr)
        return Algorithm(wrapped, inner, order, adam)
    if a == "reptile":
        return Algorithm(model, inner, maml.Reptile(), maml.reptile_sgd(config.reptile_step_size, 0.0, iterations))
    if a == "imaml":
        return Algorithm(model, inner, maml.Implicit(config.imaml_lambda, config.imaml_cg_steps), adam)
    # mamlpp: each trick its own switch.
    if config.mamlpp_per_step_bn and not isinstance(model, maml.AbstractPerStepModel):
        raise ValueError(f"--mamlpp-per-step-bn with a {type(model).__name__}: the model must be a "
                         "maml.AbstractPerStepModel (per-step batch-norm arrays and at_step)")
    strategy = order
    if config.mamlpp_first_order_iterations and not first_order:
        strategy = maml.AnnealedOrder(config.mamlpp_first_order_iterations)
    if config.mamlpp_msl:
        strategy = maml.MultiStepLoss(strategy, config.mamlpp_msl_iterations)
    if config.mamlpp_lslr:
        model = maml.LearnedLR.per_layer(model, inner_lr, steps=inner_steps)
    min_lr = min(config.mamlpp_min_lr, outer_lr)
    optimizer = maml.cosine_adam(outer_lr, iterations, min_lr) if config.mamlpp_cosine else adam
    return Algorithm(model, inner, strategy, optimizer)
