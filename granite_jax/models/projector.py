"""The Granite Speech audio projector in Flax NNX: a BLIP-2 Q-Former over windows of encoder frames.

Mirrors transformers' `GraniteSpeechEncoderProjector` (the plus variant's is the same module, with a wider
`encoder_hidden_size`): `query`, `qformer.{layernorm, encoder.layer[i].{attention, crossattention,
intermediate_query, output_query, intermediate, output}}`, `linear`. NNX paths are the HF keys minus
`projector.`, with only the leaves renamed (weight -> kernel for Linear, -> scale for LayerNorm).

What the reference does, kept here:
- the encoder output (B, T, W) is zero-padded to whole windows of `window_size` frames and each window is
  one Q-Former "image": `num_queries` learned queries cross-attend to its frames, with no mask, so the
  zero frames padding the last window are attended to like real ones;
- the queries enter with batch 1: layer 0's self-attention runs once for all windows and its
  cross-attention broadcasts them against the windows (layer 0 always cross-attends: 0 % freq == 0);
- post-LayerNorm residual blocks; the feed-forward is `intermediate_query` / `output_query`
  (`intermediate` / `output` exist only with use_qformer_text_input and are never used for queries).

Zeros past an utterance's end reproduce that utterance run alone: its last window is padded with zeros
either way, and the windows after it are all zeros (their outputs are simply not used). So
`projector(encoder_output_with_zeros_past_lengths)[i, :num_audio_embeddings(len_i)]` is row i alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from granite_jax.checkpoint.params import abstract_variables, module_from_params, variables_of
from granite_jax.models.layers import accumulator, activation, dense, layer_norm
from granite_jax.models.projector_config import ProjectorConfig


def _layer_norm(rngs: nnx.Rngs, pcfg: ProjectorConfig, **kw) -> nnx.LayerNorm:
    # two-pass variance, like torch
    return layer_norm(rngs, pcfg.hidden_size, eps=pcfg.layer_norm_eps, use_fast_variance=False, **kw)


class QFormerMultiHeadAttention(nnx.Module):
    """`Blip2QFormerMultiHeadAttention`: query/key/value projections and unmasked softmax attention.

    As cross-attention, keys and values come from the encoder windows (width encoder_hidden_size).
    """

    def __init__(self, pcfg: ProjectorConfig, *, is_cross_attention: bool, rngs: nnx.Rngs, **kw):
        kv_width = pcfg.encoder_hidden_size if is_cross_attention else pcfg.hidden_size
        self.num_heads = pcfg.num_attention_heads
        self.head_dim = pcfg.head_dim
        self.query = dense(rngs, pcfg.hidden_size, pcfg.hidden_size, **kw)
        self.key = dense(rngs, kv_width, pcfg.hidden_size, **kw)
        self.value = dense(rngs, kv_width, pcfg.hidden_size, **kw)

    def __call__(self, x: Float[Array, "bq q d"], states: Float[Array, "b k e"] | None = None) -> Float[Array, "b q d"]:
        src = x if states is None else states
        h, d = self.num_heads, self.head_dim
        q = self.query(x).reshape(*x.shape[:2], h, d)
        k = self.key(src).reshape(*src.shape[:2], h, d)
        v = self.value(src).reshape(*src.shape[:2], h, d)
        if q.shape[0] != k.shape[0]:  # the learned queries (batch 1) meet every window, as torch broadcasts
            q = jnp.broadcast_to(q, (k.shape[0], *q.shape[1:]))
        acc = accumulator(q.dtype)  # 16-bit products summed in fp32, as the dense layers do
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)  # (b h q k): windows, heads, ...
        weights = jax.nn.softmax(logits.astype(jnp.float32) * d**-0.5, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=acc).astype(v.dtype)  # (b q h d)
        return out.reshape(*out.shape[:2], h * d)


class QFormerSelfOutput(nnx.Module):
    """`Blip2QFormerSelfOutput` (and `Blip2QFormerOutput`): LayerNorm(dense(h) + residual)."""

    def __init__(self, pcfg: ProjectorConfig, n_in: int, *, rngs: nnx.Rngs, **kw):
        self.dense = dense(rngs, n_in, pcfg.hidden_size, **kw)
        self.LayerNorm = _layer_norm(rngs, pcfg, **kw)

    def __call__(self, h: Float[Array, "b q i"], residual: Float[Array, "bq q d"]) -> Float[Array, "b q d"]:
        return self.LayerNorm(self.dense(h) + residual)


class QFormerAttention(nnx.Module):
    """`Blip2QFormerAttention`: multi-head attention then the post-norm residual block."""

    def __init__(self, pcfg: ProjectorConfig, *, is_cross_attention: bool = False, rngs: nnx.Rngs, **kw):
        self.attention = QFormerMultiHeadAttention(pcfg, is_cross_attention=is_cross_attention, rngs=rngs, **kw)
        self.output = QFormerSelfOutput(pcfg, pcfg.hidden_size, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "bq q d"], states: Float[Array, "b k e"] | None = None) -> Float[Array, "b q d"]:
        return self.output(self.attention(x, states), x)


class QFormerIntermediate(nnx.Module):
    """`Blip2QFormerIntermediate`: dense to intermediate_size, then hidden_act."""

    def __init__(self, pcfg: ProjectorConfig, *, rngs: nnx.Rngs, **kw):
        self.dense = dense(rngs, pcfg.hidden_size, pcfg.intermediate_size, **kw)
        self.act = activation(pcfg.hidden_act)

    def __call__(self, x: Float[Array, "b q d"]) -> Float[Array, "b q i"]:
        return self.act(self.dense(x))


class QFormerLayer(nnx.Module):
    """`Blip2QFormerLayer` for query-only input: self-attention, cross-attention on layers
    idx % cross_attention_frequency == 0, then the query feed-forward (post-norm residual)."""

    def __init__(self, pcfg: ProjectorConfig, layer_idx: int, *, rngs: nnx.Rngs, **kw):
        self.attention = QFormerAttention(pcfg, rngs=rngs, **kw)
        self.has_cross_attention = pcfg.has_cross_attention(layer_idx)
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(pcfg, is_cross_attention=True, rngs=rngs, **kw)
        if pcfg.use_qformer_text_input:  # text-token feed-forward: a home for its weights, unused for queries
            self.intermediate = QFormerIntermediate(pcfg, rngs=rngs, **kw)
            self.output = QFormerSelfOutput(pcfg, pcfg.intermediate_size, rngs=rngs, **kw)
        self.intermediate_query = QFormerIntermediate(pcfg, rngs=rngs, **kw)
        self.output_query = QFormerSelfOutput(pcfg, pcfg.intermediate_size, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "bq q d"], states: Float[Array, "b k e"]) -> Float[Array, "b q d"]:
        x = self.attention(x)
        if self.has_cross_attention:
            x = self.crossattention(x, states)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nnx.Module):
    """`Blip2QFormerEncoder`: the stack of layers."""

    def __init__(self, pcfg: ProjectorConfig, *, rngs: nnx.Rngs, **kw):
        self.layer = nnx.List([QFormerLayer(pcfg, i, rngs=rngs, **kw) for i in range(pcfg.num_hidden_layers)])

    def __call__(self, x: Float[Array, "1 q d"], states: Float[Array, "b k e"]) -> Float[Array, "b q d"]:
        for layer in self.layer:
            x = layer(x, states)
        return x


class QFormerModel(nnx.Module):
    """`Blip2QFormerModel` on query embeddings: LayerNorm, then the encoder (no text embeddings)."""

    def __init__(self, pcfg: ProjectorConfig, *, rngs: nnx.Rngs, **kw):
        self.layernorm = _layer_norm(rngs, pcfg, **kw)
        self.encoder = QFormerEncoder(pcfg, rngs=rngs, **kw)

    def __call__(self, query_embeds: Float[Array, "1 q d"], states: Float[Array, "b k e"]) -> Float[Array, "b q d"]:
        return self.encoder(self.layernorm(query_embeds), states)


CHUNK_WINDOWS = 1024  # windows (15,360 frames, 5 min at window 15) whose K/V are held at once


class GraniteSpeechProjector(nnx.Module):
    """`GraniteSpeechEncoderProjector` in NNX: encoder output (B, T, W) -> (B, ceil(T / window) * nq, llm).

    Computes in `dtype` (default: param_dtype); softmax and LayerNorm statistics in fp32.
    """

    def __init__(self, pcfg: ProjectorConfig, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = pcfg
        self.dtype = dtype
        self.query = nnx.Param(jax.random.normal(rngs.params(), (1, pcfg.num_queries, pcfg.hidden_size), param_dtype))
        self.qformer = QFormerModel(pcfg, rngs=rngs, **kw)
        self.linear = dense(rngs, pcfg.hidden_size, pcfg.llm_hidden_size, **kw)

    @property
    def compute_dtype(self):
        return self.dtype if self.dtype is not None else self.query[...].dtype

    def __call__(self, hidden_states: Float[Array, "b t w"]) -> Float[Array, "b n l"]:
        pcfg = self.config
        b, t, w = hidden_states.shape
        if w != pcfg.encoder_hidden_size:
            raise ValueError(
                f"hidden states have width {w}; the projector expects encoder_hidden_size={pcfg.encoder_hidden_size}"
            )
        if t == 0:
            raise ValueError("hidden states must have at least one frame")
        dtype = self.compute_dtype
        win, nq = pcfg.window_size, pcfg.num_queries
        n = -(-t // win)  # windows per utterance
        query = self.query[...].astype(dtype)
        if b * n <= CHUNK_WINDOWS:
            x = jnp.pad(hidden_states.astype(dtype), ((0, 0), (0, n * win - t), (0, 0)))
            out = self.qformer(query, x.reshape(b * n, win, w))  # one Q-Former input per window
            return self.linear(out.reshape(b, n * nq, pcfg.hidden_size))

        # Long audio: windows are independent, so a chunk of them at a time is gathered straight from the
        # hidden states (no padded copy of them), run, and written into the output; the last chunk is
        # moved back to end at the last window (its overlap is recomputed, with the same result).
        total = b * n
        hidden_states = jnp.asarray(hidden_states)

        def chunk(i, out):
            first = jnp.minimum(i * CHUNK_WINDOWS, total - CHUNK_WINDOWS)
            g = first + jnp.arange(CHUNK_WINDOWS)  # window indices over the flattened batch
            frames = g[:, None] % n * win + jnp.arange(win)  # (C, win)
            xs = hidden_states[(g // n)[:, None], jnp.minimum(frames, t - 1)]  # (C, win, w)
            xs = jnp.where((frames < t)[..., None], xs, 0).astype(dtype)  # the last window's padding: zeros
            emb = self.linear(self.qformer(query, xs))  # (C, nq, llm)
            return jax.lax.dynamic_update_slice_in_dim(out, emb.astype(out.dtype), first, 0)

        out = jnp.zeros((total, nq, pcfg.llm_hidden_size), dtype)
        out = jax.lax.fori_loop(0, -(-total // CHUNK_WINDOWS), chunk, out)
        return out.reshape(b, n * nq, pcfg.llm_hidden_size)


def num_audio_embeddings(encoder_lengths: int | Sequence[int] | np.ndarray, pcfg: ProjectorConfig):
    """Projector outputs per utterance: ceil(frames / window_size) * num_queries (HF's audio_embed_sizes).

    An int gives an int; a sequence or array gives an int64 array of the same shape.
    """
    lens = np.asarray(encoder_lengths)
    if not np.issubdtype(lens.dtype, np.integer) or (lens < 0).any():
        raise ValueError(f"encoder lengths must be non-negative integers, got {encoder_lengths!r}")
    out = -(-lens.astype(np.int64) // pcfg.window_size) * pcfg.num_queries
    return int(out) if out.ndim == 0 else out


# -- parameters as flat {path: array} dicts (the converter's and the checkpoint's currency) ------------
def abstract_projector_params(pcfg: ProjectorConfig, *, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of every projector parameter, nothing allocated."""
    return abstract_variables(lambda: GraniteSpeechProjector(pcfg, param_dtype=param_dtype))


def projector_from_params(
    pcfg: ProjectorConfig,
    params: Mapping[str, np.ndarray],
    *,
    dtype=None,
    param_dtype=jnp.float32,
    consume: bool = False,
) -> GraniteSpeechProjector:
    """Build the projector with the given parameters ({NNX path: array}, paths without `projector.`).

    Cast to param_dtype. `params` may be lazy; with `consume`, each entry is deleted once on the device.
    """
    return module_from_params(
        lambda: GraniteSpeechProjector(pcfg, dtype=dtype, param_dtype=param_dtype),
        params,
        consume=consume,
        what="projector ",
    )


def projector_params_of(model: GraniteSpeechProjector) -> dict[str, np.ndarray]:
    """The projector's parameters as a flat {path: numpy array} dict."""
    return variables_of(model)
