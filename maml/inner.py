"""The inner loop: K differentiable SGD steps on a support set, and the two kinds of model it adapts
beyond a plain network.

Options, each a value: which leaves adapt (`adapt_filter`; ANIL = `maml.head_filter(model)`); learned
inner learning rates (a model that is an `AbstractLearnedRates`, e.g. `maml.LearnedLR`: Meta-SGD per
parameter, MAML++ LSLR per layer and per step); per-step parameters of the network
(`AbstractPerStepModel`, e.g. `maml.nn.PerStep`: MAML++ per-step batch norm); rematerialisation
(`checkpoint_every`: memory-bounded second order). How the outer gradient treats the inner gradients is
the strategy's business (`maml.algorithms`): it hands `InnerLoop.run` its `inner_gradient` transform.
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


class AbstractLearnedRates(eqx.Module):
    """A network together with its own (meta-learned) inner learning rates, which replace `InnerLoop.lr`.

    `model` is the network; `rates(step)` the rates of inner step `step` (a traced int32 scalar): a pytree
    shaped like the adapted leaves `eqx.filter(network, adapt_filter)` (None where a leaf does not adapt),
    each leaf broadcastable against its parameter. The inner update is `p - rate * g`. Adaptation returns
    the same wrapper with the adapted network and unchanged rates. `maml.LearnedLR` is the implementation.
    """

    model: eqx.AbstractVar[PyTree]

    @abc.abstractmethod
    def rates(self, step: Int[Array, ""]) -> PyTree:
        """The rates used at inner step `step`."""


class Adaptation(eqx.Module):
    """What an inner loop returns: the adapted model (same type as the model passed in), the support loss
    before each step `[K]`, the query loss after each step `[K]` (None unless a query set was passed),
    and strategy diagnostics (`aux`, a dict of arrays)."""

    model: PyTree
    support_losses: Float[Array, " K"]
    query_losses: Optional[Float[Array, " K"]] = None
    aux: dict = eqx.field(default_factory=dict)


def network(model: PyTree, step: Any = 0) -> PyTree:
    """The network a loss sees at inner step `step`: unwrapped from its learned rates, `at_step` if per-step."""
    net = model.model if isinstance(model, AbstractLearnedRates) else model
    return net.at_step(step) if isinstance(net, AbstractPerStepModel) else net


def _sq_dist(a: PyTree, b: PyTree) -> Float[Array, ""]:
    return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class InnerLoop(eqx.Module):
    """K steps of SGD on `loss_fn(model, x, y)`, adapting the leaves selected by `adapt_filter`.

    - `loss_fn(model, x, y) -> scalar`: the task loss; `x`, `y` are one task's batch (examples first).
    - `steps`: number of SGD steps K (0 means no adaptation).
    - `lr`: the inner learning rate; None for models that bring their own, learned, rates
      (`AbstractLearnedRates`), which replace it in any case.
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
    lr: Optional[float]
    adapt_filter: Any = eqx.field(static=True, default=eqx.is_inexact_array)
    checkpoint_every: int = eqx.field(static=True, default=0)
    unroll: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"InnerLoop: steps={self.steps!r}; expected an integer >= 0")
        if isinstance(self.lr, numbers.Real) and not self.lr > 0:
            raise ValueError(f"InnerLoop: lr={self.lr!r}; expected a positive number (or None with learned rates)")
        c = self.checkpoint_every
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0:
            raise ValueError(f"InnerLoop: checkpoint_every={c!r}; expected an integer >= 0 (0: no remat)")
        u = self.unroll
        if not isinstance(u, numbers.Integral) or isinstance(u, bool) or u < 0:
            raise ValueError(f"InnerLoop: unroll={u!r}; expected an integer >= 0 (0: always lax.scan)")

    def adapt(
        self, model: PyTree, x: Array, y: Array, *, strategy: Any = None
    ) -> tuple[PyTree, Float[Array, " steps"]]:
        """Adapt `model` on `(x, y)`; return the adapted model and the support loss before each step.

        Differentiable in `model` as `strategy` (a `maml.AbstractStrategy`) says; None: every inner gradient
        is differentiated, i.e. second order.
        """
        a = self.run(model, x, y) if strategy is None else strategy.adapt(self, model, x, y)
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
        inner_gradient: Callable[[PyTree], PyTree] = lambda grads: grads,
        query: Optional[tuple[Array, Array]] = None,
        proximal: Optional[tuple[PyTree, float]] = None,
    ) -> Adaptation:
        """The differentiable loop itself (strategies call it): `inner_gradient(grads)` is the gradient of
        every SGD update (the strategy's transform; identity: second order).

        `query = (qx, qy)`: also the query loss after each step `[K]`. `proximal = (centre, lam)` adds
        `lam/2 ||p - centre||^2` to the support loss (iMAML); `centre` is shaped like the adapted params.
        Reported support losses are `loss_fn` alone, before each step.
        """
        net, lrs = (model.model, model) if isinstance(model, AbstractLearnedRates) else (model, None)
        if lrs is None and self.lr is None:
            raise ValueError(f"InnerLoop: lr=None with a {type(model).__name__}; expected a rate, or a model with "
                             "learned rates (maml.AbstractLearnedRates)")
        params, frozen = eqx.partition(net, self.adapt_filter)
        if lrs is not None and jax.tree.structure(lrs.rates(0)) != jax.tree.structure(params):
            raise ValueError(
                f"{type(lrs).__name__}: rates have structure {jax.tree.structure(lrs.rates(0))}; expected that of the adapted "
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
            grads = inner_gradient(grads)
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
