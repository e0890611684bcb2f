"""LoRA adapters on the encoder's attention and feed-forward projections, merged into the weights on export.

`add_lora(model, rank)` wraps the chosen `nnx.Linear`s of the (stacked) blocks in `LoRALinear`: the frozen
base kernel W plus (alpha / rank) A B, with A (in, rank) drawn N(0, 1/in) and B (rank, out) zero, so training
starts from the base model exactly. A and B are `nnx.LoRAParam`s: train them alone with
`Trainer(model, wrt=nnx.LoRAParam)`. `merge_lora(model)` folds W + (alpha / rank) A B back into plain
Linears, leaving the module tree (and so the checkpoint keys) as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.models.layers import accumulator

# Projections a LoRA can target (paths inside a conformer block).
TARGETS = (
    "attn.to_q",
    "attn.to_kv",
    "attn.to_out",
    "ff1.up_proj",
    "ff1.down_proj",
    "ff2.up_proj",
    "ff2.down_proj",
)
DEFAULT_TARGETS = TARGETS
# The same for Granite Speech 5's blocks.
SPEECH5_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "feed_forward1.linear1",
    "feed_forward1.linear2",
    "feed_forward2.linear1",
    "feed_forward2.linear2",
)


def targets_of(model) -> tuple[str, ...]:
    """The projections a LoRA can target in `model`'s blocks."""
    return SPEECH5_TARGETS if isinstance(model.layers, nnx.List) else TARGETS


def _stacks(model) -> list:
    """The stacked block modules: one for 4.x, one per segment for Granite Speech 5."""
    if model.layers is None:
        return []
    return list(model.layers) if isinstance(model.layers, nnx.List) else [model.layers]


class LoRALinear(nnx.Module):
    """`base(x) + (alpha / rank) * (x @ lora_a) @ lora_b`; stacked like its base (a leading layer axis)."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, key: jax.Array):
        kernel = base.kernel.get_value()
        lead, (n_in, n_out) = kernel.shape[:-2], kernel.shape[-2:]
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        a = jax.random.normal(key, (*lead, n_in, rank), jnp.float32) / jnp.sqrt(n_in)
        self.lora_a = nnx.LoRAParam(a.astype(kernel.dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, n_out), kernel.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.base.dtype or x.dtype
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        acc = accumulator(dtype)  # 16-bit products summed in fp32, as the base layer's
        low = jnp.matmul(x.astype(dtype), a, preferred_element_type=acc).astype(dtype)
        return self.base(x) + (self.scale * jnp.matmul(low, b, preferred_element_type=acc)).astype(dtype)

    def merged(self) -> nnx.Linear:
        """The base Linear with W + (alpha / rank) A B as its kernel."""
        kernel = self.base.kernel.get_value()
        delta = jnp.einsum(
            "...ir,...ro->...io", self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        )
        self.base.kernel.set_value((kernel.astype(jnp.float32) + self.scale * delta).astype(kernel.dtype))
        return self.base


def _parents(model, target: str) -> list[tuple[nnx.Module, str]]:
    """(module, attribute) holding `target` in every stack of blocks."""
    allowed = targets_of(model)
    if target not in allowed:
        raise ValueError(f"LoRA target {target!r} is not one of {', '.join(allowed)}")
    stacks = _stacks(model)
    if not stacks:
        raise ValueError("this encoder has no blocks to put LoRA adapters on")
    owner, name = target.split(".")
    return [(getattr(stack, owner), name) for stack in stacks]


def add_lora(
    model,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Wrap the `targets` projections (default: all of `targets_of(model)`) of every block in LoRA adapters
    of `rank` (alpha defaults to rank, a scale of 1). Returns the targets wrapped."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    targets = targets_of(model) if targets is None else tuple(targets)
    key = jax.random.key(seed)
    done = []
    for target in targets:
        for parent, name in _parents(model, target):
            module = getattr(parent, name)
            if isinstance(module, LoRALinear):
                raise ValueError(f"{target} already has a LoRA adapter")
            key, sub = jax.random.split(key)
            setattr(parent, name, LoRALinear(module, rank, alpha, sub))
        done.append(target)
    return done


def merge_lora(model) -> list[str]:
    """Fold every LoRA adapter into its base kernel; the module tree is the plain one again."""
    merged = []
    for target in targets_of(model) if _stacks(model) else ():
        for parent, name in _parents(model, target):
            module = getattr(parent, name)
            if isinstance(module, LoRALinear):
                setattr(parent, name, module.merged())
                if target not in merged:
                    merged.append(target)
    return merged


def has_lora(model) -> bool:
    return bool(_stacks(model)) and any(
        isinstance(getattr(p, n), LoRALinear) for t in targets_of(model) for p, n in _parents(model, t)
    )
