"""Where the runner computes: a 1-D mesh over local devices, rows of a batch split over it.

Parameters are replicated once; each device runs its own rows under `jax.shard_map` inside the one jit
(not left to the partitioner: the tiled encoder's loops slice the batch axis, which it would gather). A
batch is padded to a multiple of the device count with dummy rows, which the caller drops again.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"
REPLICATED = PartitionSpec()
ROWS = PartitionSpec(AXIS)

DeviceSpec = int | jax.Device | Sequence[jax.Device] | None


def resolve_devices(devices: DeviceSpec) -> list[jax.Device]:
    """`devices=` of `load` / `Runner` -> a non-empty list of distinct devices local to this process.

    None: all of `jax.local_devices()`; an int: the first that many; or a list of local devices.
    """
    local = jax.local_devices()
    if devices is None:
        return list(local)
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={devices!r}: this process has {len(local)} local device(s); pass 1..{len(local)}"
            )
        return list(local[: int(devices)])
    if isinstance(devices, jax.Device):
        devices = [devices]
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence | np.ndarray):
        raise ValueError(f"devices must be None, a device count or a list of jax devices, got {devices!r}")
    devs = list(devices)
    if not devs:
        raise ValueError("devices must not be empty")
    bad = [d for d in devs if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"devices must be jax devices (e.g. from jax.local_devices()), got {bad!r}")
    if len(set(devs)) != len(devs):
        raise ValueError(f"devices must be distinct, got {devs!r}")
    remote = [d for d in devs if d not in local]
    if remote:
        raise ValueError(f"devices must be local to this process (jax.local_devices()), got {remote!r}")
    return devs


class RowMesh:
    """A 1-D mesh (axis "batch") over `devices`: batches split by rows, everything else replicated."""

    def __init__(self, devices: DeviceSpec = None):
        self.devices = resolve_devices(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, REPLICATED)
        self.rows = NamedSharding(self.mesh, ROWS)

    def __len__(self) -> int:
        return len(self.devices)

    def padded_batch(self, batch: int) -> int:
        """The batch size that `batch` rows run at: the next multiple of the number of devices."""
        n = len(self.devices)
        return -(-batch // n) * n

    def split_rows(self, x: np.ndarray | jax.Array, fill: Any = 0) -> jax.Array:
        """x split by rows over the mesh; its rows first padded with `fill` up to `padded_batch`."""
        extra = self.padded_batch(x.shape[0]) - x.shape[0]
        if extra:
            pad = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
            x = np.pad(x, pad, constant_values=fill) if isinstance(x, np.ndarray) else jax.numpy.pad(x, pad)
        return jax.device_put(x, self.rows)

    def per_device(self, fn: Callable, in_specs: tuple, out_specs: Any = ROWS) -> Callable:
        """`fn` run by each device on its own rows (`jax.shard_map`); `fn` itself on one device.

        `in_specs` / `out_specs`: a `PartitionSpec` (`REPLICATED`, `ROWS`) per argument / output, or a
        prefix of their pytrees.
        """
        if len(self.devices) == 1:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def jit(
        self,
        fn: Callable,
        in_specs: tuple,
        out_specs: Any = ROWS,
        *,
        static: tuple[str, ...] = (),
        donate: tuple[int, ...] = (),
        out_shardings: Any = None,
        on_trace: Callable[[], None] | None = None,
    ) -> Callable:
        """`jax.jit` of `fn(*arrays, **static)` run by each device on its own rows (`per_device`): the one way
        a batch meets the mesh. `static`: the keyword arguments that are compile-time constants; `donate`:
        positions of arrays whose buffers the call may reuse; `on_trace`: called once per trace."""

        def run(*arrays, **kwargs):
            if on_trace is not None:
                on_trace()
            return self.per_device(functools.partial(fn, **kwargs), in_specs, out_specs)(*arrays)

        return jax.jit(run, static_argnames=static, donate_argnums=donate, out_shardings=out_shardings)
