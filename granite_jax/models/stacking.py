"""Repeated blocks held stacked: one submodule whose variables have a leading axis, built with `nnx.vmap`
and run with `lax.scan`, so that XLA compiles one block, not one per layer. `Segments` keeps several
stacks under one attribute (Granite Speech 5's subsampling and regular blocks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class Segments:
    """Stacks kept as a list under one attribute: segment s (path `name.s.…`, leading axis k) is layer
    `offsets[s] + k`, so that the flat names stay `name.{layer}.…` (Granite Speech 5: subsampling blocks
    apart from the regular ones)."""

    name: str
    offsets: tuple[int, ...]


Stacking = str | Segments | None


def stacked_modules(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M | None:
    """`num` modules `make(rngs)` as one, each variable with a leading axis of `num` (for `nnx.scan`);
    None when `num` is 0."""
    if num == 0:
        return None

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> M:
        return make(rngs)

    return nnx.jit(build)(rngs)  # one program; run eagerly, every initialiser would compile its own


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
