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


def low_precision(dtype) -> bool:
    """True for the 16-bit float compute dtypes (bf16, fp16)."""
    return dtype is not None and jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def accumulator(dtype) -> jnp.dtype | None:
    """The `preferred_element_type` of a matmul in `dtype`: fp32 for 16-bit floats (products summed in fp32,
    which is also the form that CPUs with AVX512-BF16 and GPUs' tensor cores run fastest), else None."""
    return jnp.float32 if low_precision(dtype) else None


class Linear(nnx.Linear):
    """`nnx.Linear` on the input flattened to (frames, features): the same result, and the backward pass's
    weight gradient becomes one 2-D matmul (XLA CPU runs the 3-D contraction it would be otherwise at well
    under the speed of a plain GEMM). In a 16-bit compute dtype the products are summed in fp32, the bias
    added in fp32, and the result rounded once."""

    def __call__(self, inputs: jax.Array, *, out_sharding=None) -> jax.Array:
        lead = inputs.shape[:-1]
        x = inputs.reshape(-1, inputs.shape[-1])
        dtype = self.dtype or inputs.dtype
        if low_precision(dtype):
            kernel = self.kernel[...].astype(dtype)
            out = jnp.dot(x.astype(dtype), kernel, preferred_element_type=jnp.float32, out_sharding=out_sharding)
            if self.bias is not None:
                out = out + self.bias[...].astype(jnp.float32)
            out = out.astype(dtype)
        else:
            out = super().__call__(x, out_sharding=out_sharding)
        return out.reshape(*lead, out.shape[-1])


class TorchLinear(nnx.Module):
    """`nn.Linear` held as torch holds it: `weight` (out, in), `bias` (out,).

    For products with few rows (a decode step, a speculative pass) XLA CPU reads a weight held (out, in) faster
    than one held (in, out) (`benchmarks/bench_matvec.py`); the language model's layers use it. Same compute
    dtype rules as `Linear`: in a 16-bit dtype the products are summed in fp32, the bias added in fp32, and
    the result rounded once.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2)
        self.weight = nnx.Param(init(rngs.params(), (n_out, n_in), param_dtype))
        self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        dtype = self.dtype or inputs.dtype
        out = times_transposed(inputs, self.weight[...], dtype)
        if self.bias is not None:
            out = out + self.bias[...].astype(out.dtype)
        return out.astype(dtype)


# Up to this many rows, `times_transposed` makes the weight the product's left operand (see there).
SKINNY_ROWS = 32


def times_transposed(x: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """x (..., in) @ weight (out, in).T in `dtype`, summed (and returned) in fp32 for a 16-bit dtype.

    The rows are flattened to one axis. With few rows (a decode step, a speculative pass) XLA CPU reads the
    weight at the memory's rate only when it is the product's left operand and the result stays (out, rows):
    computed the other way round it reads it 2-3x slower from two rows on, and a 16-bit product with one row
    several times slower still (`benchmarks/bench_matvec.py`). So from two rows, and for a lone 16-bit row
    (given a zero partner), the product is weight @ rows.T behind an optimisation barrier, which keeps XLA's
    layout assignment from folding the small transpose back into the product."""
    acc = accumulator(dtype)
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    rows = flat.shape[0]
    weight = weight.astype(dtype)
    if rows > SKINNY_ROWS or (rows == 1 and acc is None):
        out = jnp.einsum("ni,oi->no", flat, weight, preferred_element_type=acc)  # (rows, out)
    else:
        if rows == 1:
            flat = jnp.concatenate([flat, jnp.zeros_like(flat)])
        out = jnp.einsum("oi,ni->on", weight, flat, preferred_element_type=acc)  # (out, rows)
        out = jax.lax.optimization_barrier(out)[:, :rows].T
    return out.reshape(*x.shape[:-1], weight.shape[0])


def dense(rngs: nnx.Rngs, n_in: int, n_out: int, *, bias: bool = True, **kw) -> Linear:
    """`nn.Linear(n_in, n_out, bias)`: kernel (n_in, n_out), the transpose of torch's weight."""
    return Linear(n_in, n_out, use_bias=bias, rngs=rngs, **kw)


def layer_norm(rngs: nnx.Rngs, dim: int, *, eps: float = TORCH_EPS, **kw) -> nnx.LayerNorm:
    """`nn.LayerNorm(dim, eps)`; its statistics are computed in fp32 whatever the compute dtype."""
    return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs, **kw)


class BatchNorm1d(nnx.BatchNorm):
    """`nn.BatchNorm1d` over the last axis (channels-last), with torch's `num_batches_tracked` counter.

    Eval mode (`use_running_average`, the default) normalises with the running statistics. Train mode
    (`model.train()`) normalises with the batch's statistics over the *valid* frames only, so that padding
    never changes a result, and updates the running statistics as torch does: momentum 0.1, the running
    variance from the unbiased batch variance (n / (n - 1)), `num_batches_tracked` + 1. (Torch counts the
    padding of a padded batch in its statistics; on an unpadded batch the two agree.) Statistics in fp32.
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

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        if self.use_running_average:
            return super().__call__(x)
        if valid is None:
            valid = jnp.ones(x.shape[:-1], bool)
        xf = x.astype(jnp.float32)
        weight = valid[..., None].astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        n = jnp.maximum(jnp.sum(weight), 1.0)
        mean = jnp.sum(xf * weight, axis=axes) / n
        var = jnp.sum(jnp.square(xf - mean) * weight, axis=axes) / n  # biased: what the batch is normalised by
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        m = 1.0 - self.momentum  # torch's momentum
        self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean).astype(self.mean.dtype)
        self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * unbiased).astype(self.var.dtype)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Dropout(nnx.Module):
    """`nn.Dropout(rate)`: the identity in eval mode (`deterministic`, the default); in train mode
    (`model.train()`) it zeroes each value with probability `rate` and scales the rest by 1 / (1 - rate),
    drawing from the explicit `key` it is given (reproducible from a seed, and fine under `lax.scan`).

    The mask is a counter-based hash of each value's index, seeded from the key (murmur3's finalizer; see
    `hash_bits`): it fuses into the elementwise kernel, where `jax.random.bernoulli` costs a large share of a
    CPU training step. The keep probability is quantised to 2^-32.
    """

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.deterministic = True

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if key is None:
            raise ValueError(
                f"dropout (rate {self.rate}) in train mode needs a random key: pass key= to the model (or "
                "use a dropout rate of 0, or model.eval())"
            )
        keep = hash_bits(key, x.shape) >= jnp.uint32(min(round(self.rate * 2**32), 2**32 - 1))
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Pseudo-random uint32 per element: murmur3's 32-bit finalizer of (index * golden ratio + seed)."""
    seed = jax.random.bits(key, (), jnp.uint32)
    h = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    for axis in range(1, len(shape)):
        h = h * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    h = h * jnp.uint32(0x9E3779B1) + seed
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """`num` independent keys from `key` (None: `num` Nones, for eval mode)."""
    return [None] * num if key is None else list(jax.random.split(key, num))
