"""Building blocks shared by the models: torch-equivalent layers and the activation table.

Each matches its torch counterpart's defaults (LayerNorm and BatchNorm epsilon 1e-5, BatchNorm momentum 0.1)
so that the model files can read like the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_EPS = 1e-5  # torch nn.LayerNorm / nn.BatchNorm1d default

# transformers' ACT2FN names -> the JAX function with the same definition.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_python_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The JAX function for a transformers ACT2FN name (one of `ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (one of {', '.join(ACTIVATIONS)})") from None


def dense(rngs: nnx.Rngs, n_in: int, n_out: int, *, bias: bool = True, **kw) -> nnx.Linear:
    """`nn.Linear(n_in, n_out, bias)`: kernel (n_in, n_out), the transpose of torch's weight."""
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs, **kw)


def layer_norm(rngs: nnx.Rngs, dim: int, *, eps: float = TORCH_EPS, **kw) -> nnx.LayerNorm:
    """`nn.LayerNorm(dim, eps)`; its statistics are computed in fp32 whatever the compute dtype."""
    return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs, **kw)


class BatchNorm1d(nnx.BatchNorm):
    """`nn.BatchNorm1d` over the last axis (channels-last), with torch's `num_batches_tracked` counter.

    In eval mode it normalises with the running statistics.
    """

    def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kw):
        super().__init__(
            num_features,
            use_running_average=True,  # eval mode; `model.train()` flips it
            momentum=0.9,  # = torch momentum 0.1
            epsilon=TORCH_EPS,
            rngs=rngs,
            **kw,
        )
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
