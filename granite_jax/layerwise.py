"""Inference one block per call, each block's weights in buffers of their own.

Inside one compiled encoder the blocks run in a scan over stacked weights, and XLA CPU copies a block's
slice of them into a fresh buffer before its matmuls (any slice, static or dynamic): 110 MB per production
block on every call. `BlockWeights` moves each block's weights out of the stacked module into arrays of its
own, and the runner calls one compiled block per block in turn on them (one compilation per block kind and
shape; the hidden states are donated from block to block). `restore` stacks them back into the module, for
training or anything else that wants the module whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class BlockWeights:
    """The blocks of stacked modules (`stacks`, each of n >= 1 blocks), each block's weights in arrays of
    its own; the stacked Variables meanwhile hold empty placeholders."""

    def __init__(self, stacks: Sequence[nnx.Module]):
        self.stacks = list(stacks)
        self.templates = []  # per stack: (graphdef, [(path, Variable)])
        self.blocks: list[tuple[int, list[jax.Array]]] = []  # per block, in order: (its stack, its values)
        for s, stack in enumerate(self.stacks):
            graphdef, state = nnx.split(stack)
            variables = nnx.to_flat_state(state)
            self.templates.append((graphdef, variables))
            n = variables[0][1].get_value().shape[0]
            values: list[list[jax.Array]] = [[] for _ in range(n)]
            for _, v in variables:  # one stacked array at a time: at most one extra array's worth held
                stacked = v.get_value()
                for i in range(n):
                    values[i].append(jax.device_put(stacked[i], stacked.sharding))  # a new buffer
                v.set_value(jnp.zeros((0,), stacked.dtype))
                del stacked
            self.blocks += [(s, block) for block in values]

    def __len__(self) -> int:
        return len(self.blocks)

    def merge(self, stack: int, values: Sequence[jax.Array]) -> nnx.Module:
        """Block module of stack `stack` over one block's `values`, in eval mode."""
        graphdef, variables = self.templates[stack]
        pairs = [(p, v.replace(x)) for (p, v), x in zip(variables, values, strict=True)]
        block = nnx.merge(graphdef, nnx.from_flat_state(pairs))
        block.eval()
        return block

    def restore(self) -> None:
        """Stack the blocks' weights back into the modules (one array at a time) and drop them here."""
        for s, (_, variables) in enumerate(self.templates):
            mine = [values for stack, values in self.blocks if stack == s]
            for j, (_, v) in enumerate(variables):
                parts = [values[j] for values in mine]
                sharding = parts[0].sharding
                v.set_value(jax.device_put(jnp.stack(parts), sharding))
                for values in mine:
                    values[j] = None
        self.blocks = []

    def num_values(self) -> int:
        return sum(int(np.prod(x.shape)) for _, values in self.blocks for x in values)
