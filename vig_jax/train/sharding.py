"""Device mesh and shardings: data parallel by default, optional FSDP-style state sharding.

One mesh axis, `data`, spans every device of every process. Batches are split along it. The
train state is replicated, or (FSDP) each large array is split along its largest axis divisible
by the number of devices; XLA inserts the all-gathers and reduce-scatters. The same code runs on
1 CPU, 1 GPU, N GPUs and several hosts.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> PartitionSpec:
    """Splits the largest axis divisible by `num_shards` of arrays with >= `min_size` elements.

    Small arrays (norms, biases, scalars) stay replicated: splitting them saves nothing and costs
    a collective each.
    """
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    # Largest first; among equal sizes the leading axis (contiguous shards).
    by_size = sorted(range(len(shape)), key=lambda i: -shape[i])
    axes = [i for i in by_size if shape[i] % num_shards == 0]
    if not axes:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh, *, fsdp: bool, fsdp_min_size: int):
    """NamedShardings for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
    if not fsdp:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_state)
    n = mesh.shape[DATA_AXIS]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n, fsdp_min_size)), abstract_state
    )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles this process's part of a batch into global arrays sharded along `data`.

    Args:
      local_batch: dict of numpy arrays [b, ...] with b = global batch / process count.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }
