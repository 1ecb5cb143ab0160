"""Data parallelism over devices (and, through `jax.distributed`, over hosts): the task batch is split,
the meta-gradient is all-reduced (`lax.pmean`), every device applies the same outer update.

`train_step(optimizer, inner, ..., over=...)` has the call shape of the single-device sampling step,
`step(state, sampler) -> (state, metrics)`, so `maml.fit` drives it unchanged (it jits a `lax.scan` of
steps around it). How the devices are mapped is a value:

- `ShardMap()` (default): `jax.shard_map` over a one-axis `Mesh` under the caller's `jit`, the modern form;
  the one to use across processes (`jax.distributed`);
- `Pmap()`: `jax.pmap` over the devices (state and sampler broadcast, the device's position mapped).

It takes `num_devices` (default: every device, of every process). State and metrics stay replicated:
the caller passes and gets back one (unstacked) `MetaTrainState`.

**Sampler protocol.** The sampler is a pytree (e.g. an `eqx.Module`) with
- `num_tasks: int` (static): the global meta-batch B, which must divide evenly across the devices;
- `sample_range(key, start, count) -> Task`: tasks `start .. start+count-1` (leading axis `count`) of the
  batch `sampler(key)` draws, task i depending only on `(key, i)` (drawn from `fold_in(key, i)`), with
  `start` possibly a traced int32 scalar.
Device d of D draws tasks `d*B/D .. (d+1)*B/D - 1` from the same key as the single-device step, so the
parallel steps see exactly the single-device batch and agree with it up to float32 round-off (the
order of the mean's sums differs). `data.sinusoid.SinusoidTasks` follows the protocol.

Device choice happens in `select_devices` only; `train_step` calls it once, when the step is made.
"""

from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int, PyTree

from .algorithms.base import AbstractStrategy
from .algorithms.order import SecondOrder
from .batching import AbstractBatching, Vmap
from .inner import InnerLoop
from .meta import MetaTrainState, SampledStep, make_train_step

AXIS = "devices"
"""Name of the device axis, for `lax.pmean` / `lax.axis_index` inside the per-device step."""


def select_devices(num_devices: Optional[int] = None) -> list[jax.Device]:
    """The devices a parallel step runs on, in mesh order: the first `num_devices // process_count` local
    devices of every process, process by process (all devices when None).

    ValueError (one line) when `num_devices` is not a positive integer, exceeds the devices that exist,
    or does not split evenly across the processes.
    """
    available, processes = jax.devices(), jax.process_count()
    if num_devices is None:
        num_devices = len(available)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r}; expected a positive integer (or None: all devices)")
    if num_devices > len(available):
        platform = available[0].platform
        hint = " (fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)" if platform == "cpu" else ""
        raise ValueError(
            f"num_devices={num_devices}, but only {len(available)} {platform} device(s) exist "
            f"over {processes} process(es){hint}"
        )
    if num_devices % processes:
        raise ValueError(f"num_devices={num_devices} does not split evenly across {processes} processes")
    per_process = num_devices // processes
    chosen = []
    for p in range(processes):
        owned = [d for d in available if d.process_index == p]
        if len(owned) < per_process:
            raise ValueError(f"num_devices={num_devices} needs {per_process} devices on process {p}; it has {len(owned)}")
        chosen += owned[:per_process]
    return chosen


def replicate(tree: PyTree, devices: Sequence[jax.Device]) -> PyTree:
    """Every array leaf of `tree` fully replicated on `devices` (a no-op for leaves already placed so).

    Optional: the parallel steps also accept single-device (uncommitted) arrays; this places them up
    front, e.g. to time steps without the first transfer.
    """
    sharding = NamedSharding(Mesh(list(devices), (AXIS,)), PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(a, sharding) if eqx.is_array(a) else a, tree)


def to_local(tree: PyTree) -> PyTree:
    """Array leaves replicated over devices (possibly of several processes) as arrays on one local device,
    for work that each process does on its own (evaluation, plots, writing results)."""

    def local(a):
        if not isinstance(a, jax.Array):
            return a
        if not a.is_fully_replicated:
            raise ValueError(f"to_local: an array of shape {a.shape} is split over devices ({a.sharding}); "
                             "expected arrays replicated on every device")
        return jnp.asarray(a.addressable_data(0))

    return jax.tree.map(local, tree)


class AllReduce(AbstractBatching):
    """Wraps a batching: the mean loss and gradient of this device's tasks, averaged over `axis_name`.

    For use inside `pmap` / `shard_map` over `axis_name`. With equal task counts per device the result
    is the mean over the whole batch (up to the order of the float sums).
    """

    batching: AbstractBatching = Vmap()
    axis_name: str = eqx.field(static=True, default=AXIS)

    def value_and_grad(self, task_loss, model, tasks):
        # Mark the parameters as varying over devices first: under `shard_map`, the gradient of a
        # replicated input is otherwise already summed over devices (the transpose of the implicit
        # broadcast), and the pmean below would scale it by the number of devices.
        model = jax.tree.map(lambda a: _as_varying(a, self.axis_name) if eqx.is_inexact_array(a) else a, model)
        loss, grads = self.batching.value_and_grad(task_loss, model, tasks)
        return jax.lax.pmean((loss, grads), self.axis_name)


def _as_varying(a: Array, axis_name: str) -> Array:
    aval = jax.typeof(a)
    varying = aval.mat.varying if hasattr(aval, "mat") else getattr(aval, "vma", frozenset())
    return a if axis_name in varying else jax.lax.pcast(a, axis_name, to="varying")


def _check_sampler(sampler, num_devices: int) -> int:
    """Tasks per device; ValueError unless `sampler` follows the protocol and its batch divides."""
    num_tasks = getattr(sampler, "num_tasks", None)
    if not callable(getattr(sampler, "sample_range", None)) or not isinstance(num_tasks, int):
        raise ValueError(
            f"sampler {type(sampler).__name__} lacks num_tasks: int and sample_range(key, start, count); "
            "the parallel steps need both (see maml.parallel)"
        )
    if num_tasks % num_devices:
        raise ValueError(
            f"meta-batch of {num_tasks} tasks does not divide evenly across {num_devices} devices; "
            f"use a batch that is a multiple of {num_devices}, or another number of devices"
        )
    return num_tasks // num_devices


def _device_step(step, num_devices: int):
    """`(state, sampler, position) -> (state, metrics)` for the device at `position` in the mesh."""

    def run(state: MetaTrainState, sampler, position: Int[Array, ""]):
        per_device = _check_sampler(sampler, num_devices)
        key, sub = jax.random.split(state.key)  # the same on every device, as in `with_task_sampler`
        tasks = sampler.sample_range(sub, position * per_device, per_device)
        return step(eqx.tree_at(lambda s: s.key, state, key), tasks)

    return run


class AbstractDeviceMap(eqx.Module):
    """How the per-device step is mapped over the devices: a value passed to `train_step`."""

    @abc.abstractmethod
    def __call__(self, per_device: Callable, devices: Sequence[jax.Device]) -> Callable:
        """`per_device(dynamic, position int32 scalar)` mapped over the positions `[D]`, the first argument
        broadcast and the result returned unstacked."""


class ShardMap(AbstractDeviceMap):
    """`jax.shard_map` over a one-axis `Mesh` under the caller's `jit`: state, sampler and metrics replicated
    (`PartitionSpec()`), the device positions split (`PartitionSpec("devices")`). Works across processes."""

    def __call__(self, per_device, devices):
        replicated, split = PartitionSpec(), PartitionSpec(AXIS)
        return jax.shard_map(lambda dynamic, position: per_device(dynamic, position[0]), mesh=Mesh(devices, (AXIS,)),
                             in_specs=(replicated, split), out_specs=replicated)


class Pmap(AbstractDeviceMap):
    """`jax.pmap`: state and sampler broadcast (`in_axes=None`), the device position mapped, the results
    unstacked (`out_axes=None`). One process only (under `jit`, multi-process pmap would take traced inputs
    for host-local shards): across processes use `ShardMap`."""

    def __call__(self, per_device, devices):
        if jax.process_count() > 1:
            raise ValueError(f"Pmap: {jax.process_count()} processes; use ShardMap() across processes")
        return jax.pmap(per_device, AXIS, in_axes=(None, 0), out_axes=None, devices=devices)


def train_step(
    optimizer: optax.GradientTransformation,
    inner: InnerLoop,
    *,
    strategy: AbstractStrategy = SecondOrder(),
    batching: AbstractBatching = Vmap(),
    num_devices: Optional[int] = None,
    over: AbstractDeviceMap = ShardMap(),
) -> SampledStep:
    """Data-parallel `step(state, sampler) -> (state, metrics)` over `num_devices` devices (all devices of
    all processes by default), mapped as `over` says (`ShardMap()` or `Pmap()`).

    Each device draws its slice of the batch (the sampler protocol above) and maps its tasks with
    `batching`; the meta-gradient is `pmean`ed and every device applies the same update. State and metrics
    come back unstacked and replicated. Jittable and scannable: `maml.fit` jits chunks of it.
    """
    if not isinstance(over, AbstractDeviceMap):
        raise ValueError(f"train_step: over={over!r}; expected maml.parallel.ShardMap() or maml.parallel.Pmap()")
    devices = select_devices(num_devices)
    n = len(devices)
    device_step = _device_step(make_train_step(optimizer, inner, strategy=strategy, batching=AllReduce(batching)), n)

    def step(state: MetaTrainState, sampler):
        # Array leaves are mapped over devices, the rest (static) is closed over.
        dynamic, static = eqx.partition((state, sampler), eqx.is_array)
        out_static = []

        def per_device(dynamic, position: Int[Array, ""]):
            out, metrics = device_step(*eqx.combine(dynamic, static), position)
            out_dynamic, s = eqx.partition(out, eqx.is_array)
            out_static.append(s)
            return out_dynamic, metrics

        out_dynamic, metrics = over(per_device, devices)(dynamic, jnp.arange(n, dtype=jnp.int32))
        return eqx.combine(out_dynamic, out_static[-1]), metrics

    return step
