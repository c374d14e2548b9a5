"""Data parallelism over the accelerators of one host or of several processes (hosts).

The global batch (and the ACT carry, which has one row per batch row) is split along its first axis
over a one-axis mesh; parameters, optimizer state and the rng are replicated. The train step runs
under `jax.shard_map`: every device runs the single-device program on its rows, gradients and
metric sums are summed over the mesh (`psum`), and the sparse puzzle-embedding update sees every
device's ids and row gradients (`all_gather`), as the reference's distributed sign-SGD does.
Random draws per row (halting exploration) are made for the whole global batch and sliced, so a
run on N devices takes the same decisions as on one and differs only by summation order.

Across processes (after hrm_jax.distributed.initialize) the mesh holds the first N local devices of
every process, in process order, so each process owns one contiguous block of the global batch's
rows (`process_rows`): it builds only those rows and `put_batch` assembles the global array from
every process's block. Values come back to the host with `fetch` (replicated ones from the local
copy, split ones gathered from every process).

shard_map rather than sharding annotations: each device's program is the single-device one, so the
custom calls (cuDNN attention, Pallas kernels) need no partitioning rules.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


class ParallelError(ValueError):
    """A device count or batch size that cannot be split; the message says what to change."""


def _devices_by_process() -> dict[int, list]:
    by_process = defaultdict(list)
    for device in jax.devices():
        by_process[device.process_index].append(device)
    return {p: sorted(devices, key=lambda d: d.id) for p, devices in sorted(by_process.items())}


def data_mesh(num_devices: int | None) -> Mesh:
    """A mesh over the first `num_devices` local devices of every process (None: all of them; in a
    multi-process run as many as the process with the fewest has)."""
    by_process = _devices_by_process()
    fewest = min(len(devices) for devices in by_process.values())
    count = fewest if num_devices is None else num_devices
    if len(by_process) == 1 and not 1 <= count <= fewest:
        platform = by_process[0][0].platform
        raise ParallelError(f"devices={num_devices}: this host has {fewest} {platform} device(s); "
                            f"pass a number from 1 to {fewest}")
    if not 1 <= count <= fewest:
        short = [f"process {p}: {len(d)}" for p, d in by_process.items() if len(d) < count]
        raise ParallelError(f"devices={num_devices} per process, but {', '.join(short)} device(s); pass a number "
                            f"from 1 to {fewest}")
    return Mesh(np.array([d for devices in by_process.values() for d in devices[:count]]), (BATCH_AXIS,))


def describe(mesh: Mesh) -> str:
    """'4 devices' or '4 devices (2 processes x 2)'."""
    processes = {d.process_index for d in mesh.devices.flat}
    if len(processes) == 1:
        return f"{mesh.size} devices"
    return f"{mesh.size} devices ({len(processes)} processes x {mesh.size // len(processes)})"


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    count = mesh.size
    if batch_size % count:
        raise ParallelError(f"{what} {batch_size} cannot be split evenly over {describe(mesh)}; choose a batch "
                            f"size divisible by {count} or another device count")


def batch_spec() -> P:
    return P(BATCH_AXIS)


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of `batch_size` that this process's devices hold (all of them in one process)."""
    indices = NamedSharding(mesh, batch_spec()).addressable_devices_indices_map((batch_size,)).values()
    spans = sorted((index[0].start or 0, batch_size if index[0].stop is None else index[0].stop) for index in indices)
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:  # data_mesh orders devices by process; a hand-made mesh might not
            raise ParallelError(f"this process's devices hold rows {spans} of the batch, not one block; build the "
                                "mesh with parallel.data_mesh")
    return slice(spans[0][0], spans[-1][1])


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of a global batch (`process_rows`; in one process the whole batch) -> global
    arrays split over the mesh. global_rows: the global batch size (None: one process, the rows given)."""
    sharding = NamedSharding(mesh, batch_spec())

    def put(value: np.ndarray) -> jax.Array:
        rows = value.shape[0] if global_rows is None else global_rows
        return jax.make_array_from_process_local_data(sharding, value, (rows, *value.shape[1:]))

    return {k: put(v) for k, v in batch.items()}


def place(tree: Any, shardings: Any) -> Any:
    """jax.device_put onto shardings that may span processes (a tree of them matching `tree`, or one).
    Every process passes the same values (host arrays or arrays on its own devices); each keeps the
    shards its devices hold. jax.device_put itself refuses a transfer across processes on CPU."""
    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def fetch(tree: Any) -> Any:
    """Host (numpy) values of a tree of arrays, wherever their shards live: replicated arrays from this
    process's copy, arrays split over several processes gathered from all of them."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def global_rows(local_rows: int, axis_name: str | None) -> tuple[int, jax.Array | int]:
    """(rows of the global batch, offset of this device's rows) inside shard_map; (local, 0) outside."""
    if axis_name is None:
        return local_rows, 0
    return local_rows * jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name) * local_rows
