"""Inference one block per call, each block's weights in buffers of their own.

Inside one compiled encoder the blocks run in a scan over stacked weights, and XLA CPU copies a block's
slice of them into a fresh buffer before its matmuls (any slice, static or dynamic): 110 MB per production
block on every call. `BlockWeights` holds each block's weights as arrays of its own (made so by `load`, or
moved out of a stacked module), and the runner calls one compiled block per block in turn on them (one
compilation per block kind and shape; the hidden states are donated from block to block). `restore`
stacks them back into the module, for training or anything else that wants the module whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.models.conformer import GraniteSpeechEncoder


def stacks_of(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, stacked module) of each stack of blocks: `layers` for 4.x, `layers.{s}` per segment for 5."""
    if isinstance(model, GraniteSpeechEncoder):
        return [(("layers",), model.layers)] if model.config.num_layers else []
    return [(("layers", s), stack) for s, stack in enumerate(model.layers)]


class BlockWeights:
    """The blocks of a model's stacked modules (each stack of n >= 1 blocks), each block's weights in arrays
    of its own, while the stacked Variables hold empty placeholders.

    `parts`: {variable path in the model: [array per block]}, as `module_from_params(unstacked=...)` gives
    them (the stacks already hold placeholders); None: the blocks are moved out of the stacked arrays here,
    one variable at a time.
    """

    def __init__(self, model: nnx.Module, parts: Mapping[tuple, list[jax.Array]] | None = None):
        self.templates = []  # per stack: (graphdef, [(path, Variable)])
        self.blocks: list[tuple[int, list[jax.Array]]] = []  # per block, in order: (its stack, its values)
        for s, (prefix, stack) in enumerate(stacks_of(model)):
            graphdef, state = nnx.split(stack)
            variables = nnx.to_flat_state(state)
            self.templates.append((graphdef, variables))
            columns = []  # per variable: its n blocks' arrays
            for path, v in variables:
                if parts is not None:
                    columns.append(parts[prefix + tuple(path)])
                    continue
                stacked = v.get_value()
                columns.append([jax.device_put(stacked[i], stacked.sharding) for i in range(stacked.shape[0])])
                v.set_value(jnp.zeros((0,), stacked.dtype))
                del stacked
            self.blocks += [(s, list(values)) for values in zip(*columns, strict=True)]

    @classmethod
    def for_runner(cls, model: nnx.Module, layerwise: bool | BlockWeights, sharding: jax.sharding.Sharding):
        """The Runner's blocks: those `load` made (the blocks never stacked), placed on `sharding`; the model's
        own, moved out of its stacks, for `layerwise=True`; None to run the module as it is."""
        if isinstance(layerwise, BlockWeights):
            layerwise.place(sharding)
            return layerwise
        return cls(model) if layerwise and stacks_of(model) else None

    def __len__(self) -> int:
        return len(self.blocks)

    def place(self, sharding: jax.sharding.Sharding) -> None:
        for _, values in self.blocks:
            values[:] = [jax.device_put(x, sharding) for x in values]

    def merge(self, stack: int, values: Sequence[jax.Array]) -> nnx.Module:
        """Block module of stack `stack` over one block's `values`, in eval mode."""
        graphdef, variables = self.templates[stack]
        pairs = [(p, v.replace(x)) for (p, v), x in zip(variables, values, strict=True)]
        block = nnx.merge(graphdef, nnx.from_flat_state(pairs))
        block.eval()
        return block

    def restore(self) -> None:
        """Stack the blocks' weights back into the modules (one variable at a time) and drop them here."""
        for s, (_, variables) in enumerate(self.templates):
            mine = [values for stack, values in self.blocks if stack == s]
            for j, (_, v) in enumerate(variables):
                parts = [values[j] for values in mine]
                v.set_value(jax.device_put(jnp.stack(parts), parts[0].sharding))
                for values in mine:
                    values[j] = None
                del parts
        self.blocks = []

    def values(self) -> list[jax.Array]:
        return [x for _, values in self.blocks for x in values]

    def num_values(self) -> int:
        return sum(int(np.prod(x.shape)) for x in self.values())
