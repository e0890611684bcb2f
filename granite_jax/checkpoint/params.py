"""NNX modules <-> flat {path: array} dicts, the converter's and the checkpoint's currency.

A module may hold repeated submodules stacked (one submodule whose variables have a leading axis, run
with `lax.scan`): `stacked` names that attribute, and its variables appear in the flat dicts one entry
per index, `layers.0.attn.to_q.kernel`, ..., as the checkpoints and the reference name them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.models.stacking import Segments, Stacking

M = TypeVar("M", bound=nnx.Module)


def path_str(path: tuple) -> str:
    """An NNX state path as the dotted name used in checkpoints, e.g. `layers.0.attn.to_q.kernel`."""
    return ".".join(str(p) for p in path)


def _names(path: tuple, shape: tuple[int, ...], stacked: Stacking) -> Iterator[tuple[str, int | None]]:
    """(flat name, index into the leading axis or None) of each entry a variable stands for."""
    if isinstance(stacked, Segments) and path[:1] == (stacked.name,):
        first = stacked.offsets[int(path[1])]
        for i in range(shape[0]):
            yield path_str((stacked.name, first + i) + tuple(path[2:])), i
    elif isinstance(stacked, str) and path[:1] == (stacked,):
        for i in range(shape[0]):
            yield path_str((stacked, i) + tuple(path[1:])), i
    else:
        yield path_str(path), None


def abstract_variables(make: Callable[[], nnx.Module], stacked: Stacking = None) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of every variable of the module `make()` builds, nothing allocated."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(make))):
        value = v.get_value()
        for name, i in _names(p, value.shape, stacked):
            out[name] = value if i is None else jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return out


def module_from_params(
    make: Callable[[], M],
    params: Mapping[str, np.ndarray],
    *,
    consume: bool = False,
    what: str = "",
    stacked: Stacking = None,
    unstacked: dict | None = None,
) -> M:
    """The module `make()` builds, with its variables set from `params` (cast to each variable's dtype).

    `params` may be lazy (read on access). With `consume`, each entry is deleted from `params` once it is
    on the device, so the weights are never held twice (a stacked variable is filled in place on the
    device, one layer at a time). `what` prefixes error messages ("projector "). `unstacked`: a dict that
    receives each stacked variable's layers as arrays of their own ({path: [array per index]}) while the
    module's variable holds an empty placeholder (the layerwise runner's weights, never stacked).
    """
    fresh = getattr(params, "fresh_arrays", False)  # each read a new array: it may become the device buffer
    model = nnx.eval_shape(make)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    names = {name for p, v in flat for name, _ in _names(p, v.get_value().shape, stacked)}
    if names != set(params):
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise ValueError(f"{what}parameters do not fit the config: missing {missing}, unexpected {extra}")
    leaves = []
    for path, var in flat:
        want = var.get_value()
        entries = list(_names(path, want.shape, stacked))
        apart = unstacked is not None and entries[0][1] is not None
        stack = None if entries[0][1] is None or apart else jnp.zeros(want.shape, want.dtype)
        parts = []
        for name, i in entries:
            value = np.asarray(params[name])
            expected = want.shape if i is None else want.shape[1:]
            if value.shape != expected:
                raise ValueError(f"{what}{name}: shape {value.shape}, config expects {expected}")
            value = _on_device(value, want.dtype, fresh)
            if apart:
                parts.append(value)
            else:
                stack = value if stack is None else _set_index(stack, value, i)  # in place: `stack` is donated
            del value
            if consume:
                del params[name]
        if apart:
            unstacked[tuple(path)] = parts
            stack = jnp.zeros((0,), want.dtype)
        leaves.append((path, var.replace(stack)))
        del stack, parts
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _on_device(value: np.ndarray, dtype, fresh: bool) -> jax.Array:
    """`value` as a jax array of `dtype`. A fresh array (read for this call alone) of that dtype is taken in
    place where the device allows (XLA CPU, 64-byte aligned: see `aligned_empty`), so it is never held twice;
    anything else is copied, as it may be a view of memory that its owner still changes (a torch tensor)."""
    if fresh and value.dtype == np.dtype(dtype):
        return jax.device_put(value)
    return jnp.array(value, dtype=dtype, copy=True)  # jnp.asarray(value, dtype) would take an aligned one in place


@functools.partial(jax.jit, donate_argnums=0)
def _set_index(stack: jax.Array, value: jax.Array, i: int) -> jax.Array:
    """stack[i] = value, in place (the stack is donated): a stacked variable is filled one layer at a time."""
    return jax.lax.dynamic_update_index_in_dim(stack, value, i, 0)


def variables_of(module: nnx.Module, stacked: Stacking = None) -> dict[str, np.ndarray]:
    """The module's variables as a flat {path: numpy array} dict (a stacked variable's entries are views)."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(module)):
        value = np.asarray(v.get_value())
        for name, i in _names(p, value.shape, stacked):
            out[name] = value if i is None else value[i]
    return out
