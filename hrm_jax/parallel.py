"""Data parallelism over the accelerators of one host.

The global batch (and the ACT carry, which has one row per batch row) is split along its first axis
over a one-axis mesh; parameters, optimizer state and the rng are replicated. The train step runs
under `jax.shard_map`: every device runs the single-device program on its rows, gradients and
metric sums are summed over the mesh (`psum`), and the sparse puzzle-embedding update sees every
device's ids and row gradients (`all_gather`), as the reference's distributed sign-SGD does.
Random draws per row (halting exploration) are made for the whole global batch and sliced, so a
run on N devices takes the same decisions as on one and differs only by summation order.

shard_map rather than sharding annotations: each device's program is the single-device one, so the
custom calls (cuDNN attention, Pallas kernels) need no partitioning rules.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


class ParallelError(ValueError):
    """A device count or batch size that cannot be split; the message says what to change."""


def data_mesh(num_devices: int | None) -> Mesh:
    """A mesh over the first `num_devices` local devices (None: all of them)."""
    devices = jax.local_devices()
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ParallelError(f"devices={num_devices}: this host has {len(devices)} {devices[0].platform} device(s); "
                            f"pass a number from 1 to {len(devices)}")
    return Mesh(np.array(devices[:count]), (BATCH_AXIS,))


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    count = mesh.size
    if batch_size % count:
        raise ParallelError(f"{what} {batch_size} cannot be split evenly over {count} devices; choose a batch "
                            f"size divisible by {count} or another device count")


def batch_spec() -> P:
    return P(BATCH_AXIS)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays with a leading batch axis -> global arrays split over the mesh."""
    return jax.device_put(batch, NamedSharding(mesh, batch_spec()))


def global_rows(local_rows: int, axis_name: str | None) -> tuple[int, jax.Array | int]:
    """(rows of the global batch, offset of this device's rows) inside shard_map; (local, 0) outside."""
    if axis_name is None:
        return local_rows, 0
    return local_rows * jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name) * local_rows
