"""NNX modules <-> flat {path: array} dicts, the converter's and the checkpoint's currency.

A module may hold repeated submodules stacked (one submodule whose variables have a leading axis, run
with `lax.scan`): `stacked` names that attribute, and its variables appear in the flat dicts one entry
per index, `layers.0.attn.to_q.kernel`, ..., as the checkpoints and the reference name them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def path_str(path: tuple) -> str:
    """An NNX state path as the dotted name used in checkpoints, e.g. `layers.0.attn.to_q.kernel`."""
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Segments:
    """Stacks kept as a list under one attribute: segment s (path `name.s.…`, leading axis k) is layer
    `offsets[s] + k`, so that the flat names stay `name.{layer}.…` (Granite Speech 5: subsampling blocks
    apart from the regular ones)."""

    name: str
    offsets: tuple[int, ...]


Stacking = str | Segments | None


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


def stacked_modules(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M | None:
    """`num` modules `make(rngs)` as one, each variable with a leading axis of `num` (for `nnx.scan`);
    None when `num` is 0."""
    if num == 0:
        return None

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> M:
        return make(rngs)

    return build(rngs)


def scan_stacked(stacked: M, body: Callable[[M, Any, Any], Any], carry: Any, xs: Any, *, mutable: Any = None) -> Any:
    """`carry = body(module_i, carry, xs[i])` for each index of a stacked module, in one `lax.scan`.

    Plain split / merge around `lax.scan`, so that it works wherever the module was built (also one closed
    over by a `jax.jit`). `mutable`: an `nnx` filter of the variables the body updates (BatchNorm statistics,
    RNG counters in training); they are written back into `stacked`. None: nothing is written back.
    """
    graphdef, state = nnx.split(stacked)

    def step(carry, inputs):
        module = nnx.merge(graphdef, inputs[0])
        carry = body(module, carry, inputs[1])
        return carry, (nnx.state(module, mutable) if mutable is not None else None)

    carry, updated = jax.lax.scan(step, carry, (state, xs))
    if mutable is not None:
        nnx.update(stacked, updated)
    return carry


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
            value = jnp.asarray(value, dtype=want.dtype)
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
