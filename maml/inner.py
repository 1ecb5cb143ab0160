"""The inner loop: K differentiable SGD steps (`lax.scan`) on a support set.

Options, each a value: which leaves adapt (`adapt_filter`; ANIL = `maml.head_filter(model)`); learned
inner learning rates (wrap the model in `LearnedLR`: Meta-SGD per parameter, MAML++ LSLR per layer and
per step); per-step parameters of the network (`AbstractPerStepModel`: MAML++ per-step batch norm);
rematerialisation (`checkpoint_every`: memory-bounded second order).
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from .strategies import AbstractStrategy, Adaptation, SecondOrder

LossFn = Callable[[PyTree, Array, Array], Float[Array, ""]]


class AbstractPerStepModel(eqx.Module):
    """A network with parameters per inner step (MAML++ per-step batch-norm weights and statistics).

    What a model needs: its per-step arrays carry a leading axis `[S, ...]` (S >= the inner steps used in
    training), and `at_step(k)` returns the network used at inner step `k` (a traced int32 scalar), e.g.
    the same module with those arrays sliced to `[...]` (`eqx.tree_at`). The support loss of step `k` and
    the query loss after step `k` use `at_step(k)` (MAML++'s convention); `k >= S` should clamp (as
    `jnp` indexing does). Batch statistics (MAML's transductive batch norm) are per step by construction;
    running statistics would be per-step state and are not kept by this library.
    """

    @abc.abstractmethod
    def at_step(self, step: Int[Array, ""]) -> PyTree:
        """The network (a callable model) used at inner step `step`."""


class LearnedLR(eqx.Module):
    """A network and its meta-learned inner learning rates, both meta-learned by the outer optimiser.

    `lr` has the structure of `eqx.filter(model, adapt_filter)` (None where a leaf does not adapt); each
    leaf is `[*param]` (Meta-SGD: one rate per parameter), `[]` (one per tensor) or, with `per_step`,
    `[S, *param]` / `[S]` (MAML++ LSLR: per layer and per step; step `k` uses `lr[k]`, clamped past S).
    The inner update is `p - lr * g`: rates are raw (may turn negative, as in Meta-SGD) and replace
    `InnerLoop.lr`. Adaptation returns a `LearnedLR` with the adapted network and the same rates.
    """

    model: PyTree
    lr: PyTree
    per_step: bool = eqx.field(static=True, default=False)

    @classmethod
    def per_parameter(cls, model: PyTree, init_lr: float, adapt_filter: Any = eqx.is_inexact_array) -> "LearnedLR":
        """Meta-SGD (Li et al. 2017): one rate per adapted parameter, all `init_lr`."""
        _check_lr("init_lr", init_lr)
        return cls(model, jax.tree.map(lambda a: jnp.full_like(a, init_lr), eqx.filter(model, adapt_filter)))

    @classmethod
    def per_layer(
        cls, model: PyTree, init_lr: float, steps: Optional[int] = None, adapt_filter: Any = eqx.is_inexact_array
    ) -> "LearnedLR":
        """One rate per adapted tensor (per layer), and per step when `steps` is given (LSLR)."""
        _check_lr("init_lr", init_lr)
        shape = () if steps is None else (steps,)
        if steps is not None and (not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"LearnedLR.per_layer: steps={steps!r}; expected an integer >= 1 or None")
        rates = jax.tree.map(lambda a: jnp.full(shape, init_lr, a.dtype), eqx.filter(model, adapt_filter))
        return cls(model, rates, per_step=steps is not None)

    def rates(self, step: Int[Array, ""]) -> PyTree:
        """The rates used at inner step `step`."""
        return jax.tree.map(lambda r: r[step], self.lr) if self.per_step else self.lr

    def __call__(self, *args, **kwargs):
        """The network's output (for plotting / per-example use; losses see `network(model, k)`)."""
        return network(self)(*args, **kwargs)


def _check_lr(name: str, lr: Any) -> None:
    if isinstance(lr, numbers.Real) and not lr > 0:
        raise ValueError(f"{name}={lr!r}; expected a positive number")


def network(model: PyTree, step: Any = 0) -> PyTree:
    """The network a loss sees at inner step `step`: unwrapped from `LearnedLR`, `at_step` if per-step."""
    net = model.model if isinstance(model, LearnedLR) else model
    return net.at_step(step) if isinstance(net, AbstractPerStepModel) else net


def _sq_dist(a: PyTree, b: PyTree) -> Float[Array, ""]:
    return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class InnerLoop(eqx.Module):
    """K steps of SGD on `loss_fn(model, x, y)`, adapting the leaves selected by `adapt_filter`.

    - `loss_fn(model, x, y) -> scalar`: the task loss; `x`, `y` are one task's batch (examples first).
    - `steps`: number of SGD steps K (0 means no adaptation).
    - `lr`: the inner learning rate (a `LearnedLR` model brings its own, learned, rates instead).
    - `adapt_filter`: an Equinox filter (callable on leaves, or a pytree of bools shaped like the network)
      choosing which leaves adapt; the others stay at their meta-learned value (ANIL: only the head).
    - `checkpoint_every`: 0 keeps every step's intermediates for the outer backward pass (memory O(K));
      n >= 1 runs segments of n steps under `jax.checkpoint`, storing only segment boundaries and
      recomputing a segment during the backward pass (n = 1: per step; n ~ sqrt(K): O(sqrt K) memory).
      Same gradient, about one more forward pass of compute.
    - `unroll`: loops of at most this many steps (without `checkpoint_every`) are traced as straight-line
      code; longer ones run in `lax.scan` (compile time independent of K). Same maths; unrolled is
      faster where a step is cheap: scan stacks each step's residuals for the backward pass (the
      sinusoid meta-step is about 20% faster on CPU with its one step unrolled).
    """

    loss_fn: LossFn = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    lr: float
    adapt_filter: Any = eqx.field(static=True, default=eqx.is_inexact_array)
    checkpoint_every: int = eqx.field(static=True, default=0)
    unroll: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"InnerLoop: steps={self.steps!r}; expected an integer >= 0")
        if isinstance(self.lr, numbers.Real) and not self.lr > 0:
            raise ValueError(f"InnerLoop: lr={self.lr!r}; expected a positive number")
        c = self.checkpoint_every
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0:
            raise ValueError(f"InnerLoop: checkpoint_every={c!r}; expected an integer >= 0 (0: no remat)")
        u = self.unroll
        if not isinstance(u, numbers.Integral) or isinstance(u, bool) or u < 0:
            raise ValueError(f"InnerLoop: unroll={u!r}; expected an integer >= 0 (0: always lax.scan)")

    def adapt(
        self, model: PyTree, x: Array, y: Array, *, strategy: AbstractStrategy = SecondOrder()
    ) -> tuple[PyTree, Float[Array, " steps"]]:
        """Adapt `model` on `(x, y)`; return the adapted model and the support loss before each step.

        Differentiable in `model` as `strategy` says (second order by default).
        """
        a = strategy.adapt(self, model, x, y)
        return a.model, a.support_losses

    def query_loss(self, adapted: PyTree, x: Array, y: Array) -> Float[Array, ""]:
        """`loss_fn` of an adapted model on a batch, at the last inner step's view of the network."""
        return self.loss_fn(network(adapted, max(self.steps - 1, 0)), x, y)

    def run(
        self,
        model: PyTree,
        x: Array,
        y: Array,
        *,
        strategy: AbstractStrategy = SecondOrder(),
        query: Optional[tuple[Array, Array]] = None,
        proximal: Optional[tuple[PyTree, float]] = None,
    ) -> Adaptation:
        """The differentiable loop itself (strategies call it): `strategy.inner_gradient` at every step.

        `query = (qx, qy)`: also the query loss after each step `[K]`. `proximal = (centre, lam)` adds
        `lam/2 ||p - centre||^2` to the support loss (iMAML); `centre` is shaped like the adapted params.
        Reported support losses are `loss_fn` alone, before each step.
        """
        net, lrs = (model.model, model) if isinstance(model, LearnedLR) else (model, None)
        params, frozen = eqx.partition(net, self.adapt_filter)
        if lrs is not None and jax.tree.structure(lrs.lr) != jax.tree.structure(params):
            raise ValueError(
                f"LearnedLR: lr has structure {jax.tree.structure(lrs.lr)}; expected that of the adapted "
                f"leaves, {jax.tree.structure(params)} (build it with the InnerLoop's adapt_filter)"
            )

        def loss_at(p, k, bx, by):
            return self.loss_fn(network(eqx.combine(p, frozen), k), bx, by)

        def total(p, k):
            loss = loss_at(p, k, x, y)
            if proximal is None:
                return loss, loss
            centre, lam = proximal
            return loss + 0.5 * lam * _sq_dist(p, centre), loss

        def step(p, k):
            (_, loss), grads = jax.value_and_grad(total, has_aux=True)(p, k)
            grads = strategy.inner_gradient(grads)
            if lrs is None:
                p = jax.tree.map(lambda a, g: a - self.lr * g, p, grads)
            else:
                p = jax.tree.map(lambda a, g, r: a - r * g, p, grads, lrs.rates(k))
            out = (loss,) if query is None else (loss, loss_at(p, k, *query))
            return p, out

        params, outs = self._scan(step, params)
        adapted = eqx.combine(params, frozen)
        if lrs is not None:
            adapted = eqx.tree_at(lambda m: m.model, lrs, adapted)
        return Adaptation(adapted, outs[0], outs[1] if query is not None else None)

    def _scan(self, step, params):
        ks = jnp.arange(self.steps, dtype=jnp.int32)
        n = self.checkpoint_every
        if n == 0 and 0 < self.steps <= self.unroll:
            outs = []
            for k in range(self.steps):
                params, out = step(params, jnp.int32(k))
                outs.append(out)
            return params, jax.tree.map(lambda *o: jnp.stack(o), *outs)
        if n == 0 or self.steps == 0:
            return jax.lax.scan(step, params, ks, unroll=True)
        segment = jax.checkpoint(lambda p, kk: jax.lax.scan(step, p, kk, unroll=True), prevent_cse=False)
        full = self.steps // n
        params, outs = jax.lax.scan(segment, params, ks[: full * n].reshape(full, n))
        outs = jax.tree.map(lambda o: o.reshape(full * n), outs)
        if self.steps > full * n:
            params, tail = segment(params, ks[full * n :])
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, tail)
        return params, outs

    def with_steps(self, steps: int) -> "InnerLoop":
        """The same inner loop with another number of steps (e.g. for evaluation)."""
        return dataclasses.replace(self, steps=steps)
