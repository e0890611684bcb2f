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

from granite_jax.modeling import GraniteSpeechEncoder

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
        return self.base(x) + (self.scale * ((x.astype(dtype) @ a) @ b)).astype(dtype)

    def merged(self) -> nnx.Linear:
        """The base Linear with W + (alpha / rank) A B as its kernel."""
        kernel = self.base.kernel.get_value()
        delta = jnp.einsum(
            "...ir,...ro->...io", self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        )
        self.base.kernel.set_value((kernel.astype(jnp.float32) + self.scale * delta).astype(kernel.dtype))
        return self.base


def _parent(model: GraniteSpeechEncoder, target: str):
    if target not in TARGETS:
        raise ValueError(f"LoRA target {target!r} is not one of {', '.join(TARGETS)}")
    if model.layers is None:
        raise ValueError("this encoder has no blocks to put LoRA adapters on")
    owner, name = target.split(".")
    return getattr(model.layers, owner), name


def add_lora(
    model: GraniteSpeechEncoder,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[str]:
    """Wrap the `targets` projections of every block in LoRA adapters of `rank` (alpha defaults to rank, a
    scale of 1). Returns the targets wrapped."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    keys = jax.random.split(jax.random.key(seed), len(targets))
    done = []
    for target, key in zip(targets, keys, strict=True):
        parent, name = _parent(model, target)
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{target} already has a LoRA adapter")
        setattr(parent, name, LoRALinear(module, rank, alpha, key))
        done.append(target)
    return done


def merge_lora(model: GraniteSpeechEncoder) -> list[str]:
    """Fold every LoRA adapter into its base kernel; the module tree is the plain one again."""
    merged = []
    for target in TARGETS:
        if model.layers is None:
            break
        parent, name = _parent(model, target)
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            setattr(parent, name, module.merged())
            merged.append(target)
    return merged


def has_lora(model: GraniteSpeechEncoder) -> bool:
    return model.layers is not None and any(isinstance(getattr(*_parent(model, t)), LoRALinear) for t in TARGETS)
