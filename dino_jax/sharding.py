"""Device mesh and shardings for the train step (single host or many).

The mesh has two axes, ``('data', 'fsdp')``. The batch is split over both
(every device gets ``global_batch / num_devices`` images). Parameters and the
optimiser state are replicated by default; with ``num_fsdp > 1`` every large
tensor is split along its largest axis divisible by ``num_fsdp`` over the
``'fsdp'`` axis (ZeRO-3 style: XLA all-gathers it for the forward/backward and
reduce-scatters the gradient), which divides parameter and optimiser memory
by ``num_fsdp``.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Tensors with fewer elements than this stay replicated under fsdp: sharding
# them saves nothing and costs a collective each.
MIN_FSDP_SIZE = 2 ** 14


def make_mesh(num_fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (num_devices / num_fsdp, num_fsdp) with axes ('data', 'fsdp')
    over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if num_fsdp < 1 or n % num_fsdp:
        raise ValueError(f"num_fsdp={num_fsdp} does not divide the {n} devices")
    if n > 1 and (devices == list(jax.devices()) or devices[0].platform == "tpu"):
        try:  # topology-aware order (keeps fsdp groups on fast links; TPU: also the
            # compile-only devices of benchmarks/tpu_aot.py)
            arr = mesh_utils.create_device_mesh((n // num_fsdp, num_fsdp), devices)
        except Exception:  # noqa: BLE001  (CPU / unusual topologies)
            arr = np.asarray(devices).reshape(n // num_fsdp, num_fsdp)
    else:
        arr = np.asarray(devices, dtype=object).reshape(n // num_fsdp, num_fsdp)
    return Mesh(arr, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """One clear ValueError line when the devices (or hosts) can't split the batch."""
    n = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} "
                         f"devices of the mesh: use a multiple of {n}")
    hosts = jax.process_count()
    if global_batch_size % hosts:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{hosts} hosts")


def per_host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    check_batch_size(global_batch_size, mesh)
    return global_batch_size // jax.process_count()


def fsdp_spec(shape: Sequence[int], num_fsdp: int, min_size: int = MIN_FSDP_SIZE) -> P:
    """PartitionSpec splitting the largest axis divisible by ``num_fsdp`` over
    'fsdp' (replicated when there is none or the tensor is small)."""
    if num_fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % num_fsdp == 0 and d >= num_fsdp]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool = True, min_size: int = MIN_FSDP_SIZE):
    """NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs):
    fsdp-split when ``fsdp`` and the mesh has an fsdp axis > 1, else replicated."""
    num_fsdp = mesh.shape[FSDP_AXIS] if fsdp else 1
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), num_fsdp, min_size)), tree)


def shard_host_batch(batch: Any, mesh: Mesh) -> Any:
    """Per-host numpy batch (leading axis = this host's share) -> global jax.Arrays
    split over the mesh's batch axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        batch)
