"""The Granite language model (transformers' `models/granite/modeling_granite.py`) in NNX.

A Llama-style decoder with Granite's four multipliers: `embedding_multiplier` scales the input embeddings
(after the audio embeddings are merged in, so those too), `attention_multiplier` is the score scale,
`residual_multiplier` scales each branch before its residual sum, and the logits are divided by
`logits_scaling`. RMSNorm in fp32, RoPE, grouped-query attention, SwiGLU.

The blocks are a plain list, each with weights of its own: a decode step reads every weight once (a stacked
scan would copy each layer's slice before its matmuls on XLA CPU, doubling the memory traffic per token).

`__call__(embeds, start, cache)` runs S new positions per row, `start[b]` onwards, against a static KV cache
(`KVCache`: (B, L, kv_heads, head_dim) per layer) and writes their keys and values into it; the same call is
the prefill (start 0), a decode step (S = 1) and a speculative verification (S = draft + 1). Without a cache
it is the reference's forward on whole sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from granite_jax.checkpoint.params import abstract_variables, module_from_params, variables_of
from granite_jax.models.granite_config import GraniteConfig
from granite_jax.models.layers import TorchLinear, accumulator, activation, times_transposed


class KVCache(NamedTuple):
    """Per layer, keys and values of every position written so far: (B, L, kv_heads, head_dim) each."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: GraniteConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(n)), tuple(jnp.zeros(shape, dtype) for _ in range(n)))

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class GraniteRMSNorm(nnx.Module):
    """x / rms(x) in fp32, cast back, times `weight`."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rotary(positions: Int[Array, "b s"], cfg: GraniteConfig, dtype) -> tuple[Array, Array]:
    """(cos, sin), (B, S, head_dim) each: `GraniteRotaryEmbedding` (default RoPE) at `positions`."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (b, s, head_dim / 2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def write(cache: Float[Array, "b l k d"], new: Float[Array, "b s k d"], start: Int[Array, " b"]) -> Array:
    """cache[b, start[b] : start[b] + S] = new[b], for every row (the caller keeps start + S <= L)."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(cache, new, start)


class GraniteAttention(nnx.Module):
    def __init__(self, cfg: GraniteConfig, *, rngs: nnx.Rngs, **kw):
        self.config = cfg
        h, d, kv = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads
        self.q_proj = TorchLinear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias, rngs=rngs, **kw)
        self.k_proj = TorchLinear(h, kv * d, bias=cfg.attention_bias, rngs=rngs, **kw)
        self.v_proj = TorchLinear(h, kv * d, bias=cfg.attention_bias, rngs=rngs, **kw)
        self.o_proj = TorchLinear(cfg.num_attention_heads * d, h, bias=cfg.attention_bias, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, start, cache_kv):
        """x (B, S, hidden) at positions start[b] + [0, S) -> (B, S, hidden), the layer's (keys, values)."""
        cfg = self.config
        b, s, _ = x.shape
        kv, g, d = cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        q = self.q_proj(x).reshape(b, s, kv * g, d)
        k = self.k_proj(x).reshape(b, s, kv, d)
        v = self.v_proj(x).reshape(b, s, kv, d)
        q = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        if cache_kv is None:  # the whole sequence: keys are the new positions themselves
            keys, values, first = k, v, jnp.zeros_like(start)
        else:
            keys, values = write(cache_kv[0], k, start), write(cache_kv[1], v, start)
            first = start
        # query i of row b (position start[b] + i) sees key slots j <= start[b] + i
        slots = jnp.arange(keys.shape[1])
        visible = slots[None, None, :] <= (first[:, None] + jnp.arange(s)[None, :])[..., None]  # (b, s, l)
        q = q.reshape(b, s, kv, g, d)
        acc = accumulator(x.dtype)
        scores = jnp.einsum("bskgd,blkd->bkgsl", q, keys, preferred_element_type=acc)  # (b, kv, g, s, l)
        scores = scores.astype(jnp.float32) * cfg.attention_multiplier
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgsl,blkd->bskgd", probs, values, preferred_element_type=acc).astype(x.dtype)
        return self.o_proj(out.reshape(b, s, kv * g * d)), (keys, values)


class GraniteMLP(nnx.Module):
    def __init__(self, cfg: GraniteConfig, *, rngs: nnx.Rngs, **kw):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = TorchLinear(h, i, bias=cfg.mlp_bias, rngs=rngs, **kw)
        self.up_proj = TorchLinear(h, i, bias=cfg.mlp_bias, rngs=rngs, **kw)
        self.down_proj = TorchLinear(i, h, bias=cfg.mlp_bias, rngs=rngs, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GraniteDecoderLayer(nnx.Module):
    def __init__(self, cfg: GraniteConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, **kw):
        self.self_attn = GraniteAttention(cfg, rngs=rngs, param_dtype=param_dtype, **kw)
        self.mlp = GraniteMLP(cfg, rngs=rngs, param_dtype=param_dtype, **kw)
        self.input_layernorm = GraniteRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = GraniteRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.residual_multiplier = cfg.residual_multiplier

    def __call__(self, x, cos, sin, start, cache_kv):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, start, cache_kv)
        x = x + h * self.residual_multiplier
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier
        return x, kv


class GraniteModel(nnx.Module):
    def __init__(self, cfg: GraniteConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                GraniteDecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = GraniteRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, embeds, start, cache: KVCache | None = None):
        """(B, S, hidden) input embeddings (not yet scaled) -> (normed hidden states, the updated cache)."""
        cfg = self.config
        dtype = self.dtype or embeds.dtype
        x = (embeds * cfg.embedding_multiplier).astype(dtype)
        positions = start[:, None] + jnp.arange(x.shape[1])[None, :]
        cos, sin = rotary(positions, cfg, dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, start, None if cache is None else (cache.keys[i], cache.values[i]))
            keys.append(k)
            values.append(v)
        new_cache = None if cache is None else KVCache(tuple(keys), tuple(values))
        return self.norm(x), new_cache


class GraniteForCausalLM(nnx.Module):
    """`GraniteForCausalLM`: the decoder and `lm_head` (None when tied to `embed_tokens`)."""

    def __init__(self, cfg: GraniteConfig, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.model = GraniteModel(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else TorchLinear(
                cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        )

    def embed(self, ids: Int[Array, "b s"]) -> Float[Array, "b s d"]:
        """The token embeddings (before `embedding_multiplier`, which the decoder applies)."""
        out = self.model.embed_tokens(ids)
        return out.astype(self.model.dtype) if self.model.dtype is not None else out

    def __call__(self, embeds, start, cache: KVCache | None = None):
        return self.model(embeds, start, cache)

    def head(self, hidden: Float[Array, "... d"]) -> Float[Array, "... v"]:
        """`lm_head` without the division by `logits_scaling` (what transformers' speech model returns; the
        same argmax)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return times_transposed(hidden, self.model.embed_tokens.embedding[...], hidden.dtype)  # (..., vocab)

    def logits(self, hidden: Float[Array, "... d"]) -> Float[Array, "... v"]:
        """The model's logits: `lm_head(hidden) / logits_scaling`, in fp32 (`GraniteForCausalLM`)."""
        return self.head(hidden).astype(jnp.float32) / self.config.logits_scaling


# -- parameters as flat {path: array} dicts (the converter's and the checkpoint's currency) ------------
def abstract_lm_params(cfg: GraniteConfig, *, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of every parameter, nothing allocated."""
    return abstract_variables(lambda: GraniteForCausalLM(cfg, param_dtype=param_dtype))


def lm_from_params(
    cfg: GraniteConfig, params: Mapping[str, np.ndarray], *, dtype=None, param_dtype=jnp.float32, consume: bool = False
) -> GraniteForCausalLM:
    """Build the language model with the given parameters (cast to param_dtype); `params` may be lazy, and with
    `consume` each entry is dropped once it is on the device."""
    return module_from_params(
        lambda: GraniteForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype),
        params,
        consume=consume,
        what="language model ",
    )


def lm_params_of(model: GraniteForCausalLM) -> dict[str, np.ndarray]:
    return variables_of(model)
