"""Granite Speech 5 (TurboCTC) in Flax NNX: transformers' `GraniteSpeech5ForCTC`, an encoder-only CTC recogniser.

The module tree mirrors torch's (`input_linear`, `layers.{i}.{feed_forward1, self_attn, conv, feed_forward2,
norm_*}`, `out`, `out_mid`, `ctc_head` when untied). It shares the 4.x design: block-local attention with
Shaw relative positions (one table per layer, `modeling.local_attention`), a conv module and a macaron
feed-forward, CTC self-conditioning after block `num_hidden_layers // 2`. New here: the blocks listed in
`subsample_layers` halve time (a stride-2 depthwise conv beside a mean-pooled residual; a trailing odd frame
is dropped and the padding mask halved).

The blocks are stacked by segment: each subsampling block alone, each run of regular blocks as one stack
under one `lax.scan` (`layers` is a list of stacks, the flat names stay `layers.{i}.…`). Every module takes
a `valid` mask, so that a padded batch reproduces each utterance run alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from granite_jax.checkpoint.params import abstract_variables, module_from_params, variables_of
from granite_jax.models.conformer import EncoderOutput, depthwise_taps, local_attention, masked, shaw_logits
from granite_jax.models.layers import ACTIVATIONS, BatchNorm1d, Dropout, dense, layer_norm, split_key
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.models.stacking import Segments, scan_stacked, stacked_modules


class FeedForward(nnx.Module):
    """linear1 -> activation -> dropout -> linear2 (biases per `attention_bias`)."""

    def __init__(self, cfg: Speech5Config, *, rngs: nnx.Rngs, **kw):
        self.linear1 = dense(rngs, cfg.hidden_size, cfg.intermediate_size, bias=cfg.attention_bias, **kw)
        self.linear2 = dense(rngs, cfg.intermediate_size, cfg.hidden_size, bias=cfg.attention_bias, **kw)
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.dropout = Dropout(cfg.activation_dropout)

    def __call__(self, x: Float[Array, "b t d"], key: Array | None = None) -> Float[Array, "b t d"]:
        return self.linear2(self.dropout(self.activation(self.linear1(x)), key))


class Attention(nnx.Module):
    """Block-local attention with Shaw relative positions: q/k/v without bias, o with; the table of
    2 * max_position_embeddings + 1 rows is the layer's own. Dropout on the weights (`attention_dropout`)."""

    def __init__(self, cfg: Speech5Config, *, rngs: nnx.Rngs, **kw):
        self.num_heads = cfg.num_attention_heads
        self.context_size = cfg.context_size
        self.max_position_embeddings = cfg.max_position_embeddings
        self.q_proj = dense(rngs, cfg.hidden_size, cfg.inner_dim, bias=False, **kw)
        self.k_proj = dense(rngs, cfg.hidden_size, cfg.inner_dim, bias=False, **kw)
        self.v_proj = dense(rngs, cfg.hidden_size, cfg.inner_dim, bias=False, **kw)
        self.o_proj = dense(rngs, cfg.inner_dim, cfg.hidden_size, **kw)
        self.rel_pos_emb = nnx.Embed(2 * cfg.max_position_embeddings + 1, cfg.head_dim, rngs=rngs, **kw)
        self.dropout = Dropout(cfg.attention_dropout)

    def __call__(
        self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None
    ) -> Float[Array, "b t d"]:
        table = self.rel_pos_emb.embedding[...]
        out = local_attention(
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            valid,
            self.num_heads,
            self.context_size,
            lambda q: shaw_logits(q, table, self.max_position_embeddings),
            None if key is None else lambda w: self.dropout(w, key),
        )
        return self.o_proj(out)


class ConvModule(nnx.Module):
    """pointwise_lin1 -> GLU -> (padding zeroed) depthwise conv (stride 1 or 2, `same` padding) -> BatchNorm
    (fp32) -> SiLU -> pointwise_lin2."""

    def __init__(self, cfg: Speech5Config, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        inner = cfg.hidden_size * cfg.conv_expansion_factor
        self.kernel_size = cfg.conv_kernel_size
        self.pointwise_lin1 = dense(rngs, cfg.hidden_size, 2 * inner, **kw)
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=())
        # the depthwise kernel: (kernel_size, channels); torch's weight is (channels, 1, kernel_size)
        self.depthwise_conv = nnx.Param(init(rngs.params(), (cfg.conv_kernel_size, inner), param_dtype))
        self.norm = BatchNorm1d(inner, rngs=rngs, param_dtype=jnp.float32)  # kept in fp32, as transformers does
        self.pointwise_lin2 = dense(rngs, inner, cfg.hidden_size, **kw)

    def __call__(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], stride: int = 1) -> Array:
        """(b, ceil(t / stride), d): the conv's outputs at every `stride`-th frame."""
        a, gate = jnp.split(self.pointwise_lin1(x), 2, axis=-1)
        h = masked(a * jax.nn.sigmoid(gate), valid)  # GLU; the conv sees zeros past each row's end
        pad = (self.kernel_size - 1) // 2
        h = depthwise_taps(jnp.pad(h, ((0, 0), (pad, pad), (0, 0))), self.depthwise_conv[...].astype(h.dtype))
        h, out_valid = h[:, ::stride], valid[:, ::stride]  # output frame j is centred on input frame j * stride
        h = nnx.silu(self.norm(h.astype(jnp.float32), out_valid)).astype(x.dtype)
        return self.pointwise_lin2(h)


class EncoderBlock(nnx.Module):
    """`GraniteSpeech5EncoderBlock`: x + ff1/2, + attention, + conv, + ff2/2, LayerNorm. `subsample` is
    `GraniteSpeech5EncoderSubsamplingBlock` (same weights): the conv at stride 2, beside the residual
    mean-pooled in pairs (a trailing odd frame dropped)."""

    def __init__(self, cfg: Speech5Config, *, rngs: nnx.Rngs, **kw):
        self.feed_forward1 = FeedForward(cfg, rngs=rngs, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, **kw)
        self.conv = ConvModule(cfg, rngs=rngs, **kw)
        self.feed_forward2 = FeedForward(cfg, rngs=rngs, **kw)
        for name in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            setattr(self, name, layer_norm(rngs, cfg.hidden_size, **kw))

    def __call__(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None) -> Array:
        k1, k2, k3 = split_key(key, 3)
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x), k1)
        x = x + self.self_attn(self.norm_self_att(x), valid, k2)
        x = x + self.conv(self.norm_conv(x), valid)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x), k3)
        return self.norm_out(x)

    def subsample(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None) -> Array:
        """(b, t // 2, d)."""
        k1, k2, k3 = split_key(key, 3)
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x), k1)
        x = x + self.self_attn(self.norm_self_att(x), valid, k2)
        conv = self.conv(self.norm_conv(x), valid, stride=2)
        half = x.shape[1] // 2
        x = x[:, : 2 * half].reshape(x.shape[0], half, 2, -1).mean(axis=2) + conv[:, :half]
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x), k3)
        return self.norm_out(x)


def halve(valid: Bool[Array, "b t"]) -> Bool[Array, "b t//2"]:
    """The padding mask after a subsampling block: a frame is valid when both of its source frames are."""
    half = valid.shape[1] // 2
    return valid[:, : 2 * half].reshape(valid.shape[0], half, 2).all(axis=2)


def segments(cfg: Speech5Config) -> list[tuple[int, int, bool]]:
    """(first block, end, subsampling) of each stack: every subsampling block alone, runs of the others."""
    out, start = [], 0
    for i in range(cfg.num_hidden_layers + 1):
        if i == cfg.num_hidden_layers or i in cfg.subsample_layers:
            if i > start:
                out.append((start, i, False))
            if i < cfg.num_hidden_layers:
                out.append((i, i + 1, True))
            start = i + 1
    return out


class GraniteSpeech5Encoder(nnx.Module):
    """`GraniteSpeech5ForCTC` in NNX (the encoder, and `ctc_head` when it is not tied to `out`).

    `forward(features, valid)`: (B, T, 4 * num_mel_bins) features and their (B, T) mask -> `EncoderOutput`
    with (B, T', hidden) hidden states, T' = T halved per subsampling block, and their mask `valid`.
    """

    def __init__(self, cfg: Speech5Config, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.input_linear = dense(rngs, cfg.input_dim, cfg.hidden_size, **kw)
        self.layers = nnx.List(
            [
                stacked_modules(lambda r: EncoderBlock(cfg, rngs=r, **kw), end - start, rngs)
                for start, end, _ in segments(cfg)
            ]
        )
        self.out = dense(rngs, cfg.hidden_size, cfg.vocab_size, **kw)
        self.out_mid = dense(rngs, cfg.vocab_size, cfg.hidden_size, **kw)
        if not cfg.tie_word_embeddings:
            self.ctc_head = dense(rngs, cfg.hidden_size, cfg.vocab_size, **kw)

    @property
    def stacking(self) -> Segments:
        return Segments("layers", tuple(start for start, _, _ in segments(self.config)))

    def ctc_logits(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """The CTC head (`out` itself when tied)."""
        return (self.out if self.config.tie_word_embeddings else self.ctc_head)(hidden)

    def self_condition(self, x: Float[Array, "b t d"]) -> tuple[Array, Array]:
        """(x + out_mid(softmax(out(x))), out(x))."""
        logits = self.out(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        return x + self.out_mid(probs), logits

    def __call__(self, features: Array, valid: Array | None = None, **kw) -> Array:
        return self.forward(features, valid, **kw).last_hidden_state

    def forward(
        self,
        features: Float[Array, "b t f"],
        valid: Bool[Array, "b t"] | None = None,
        *,
        strategy=None,
        key: Array | None = None,
        hidden_states: bool = False,
        mid_logits: bool = False,
    ) -> EncoderOutput:
        """The encoder: every segment in turn, the self-conditioning after block num_hidden_layers // 2.
        `strategy`: None or a `train.Remat()` (rematerialise each block). `hidden_states`: HF's per-layer
        outputs as a tuple (their lengths differ; the self-conditioning block's without its term, as
        transformers adds it out of place). `mid_logits`: the self-conditioning block's `out` logits."""
        cfg = self.config
        if features.shape[-1] != cfg.input_dim:
            raise ValueError(f"features have {features.shape[-1]} channels, this encoder expects {cfg.input_dim}")
        if valid is None:
            valid = jnp.ones(features.shape[:2], bool)
        remat = type(strategy).__name__ == "Remat"
        x = masked(self.input_linear(features), valid)
        states = [x] if hidden_states else None
        logits = None
        keys = split_key(key, cfg.num_hidden_layers)
        for stack, (start, end, subsampling) in zip(self.layers, segments(cfg), strict=True):
            layer_keys = None if key is None else jnp.stack(keys[start:end])
            x, valid, saved, here = self._segment(
                stack, x, valid, start, end, subsampling, layer_keys, remat, hidden_states, mid_logits
            )
            if here is not None:
                logits = here
            if states is not None:
                states += list(saved)
        return EncoderOutput(x, tuple(states) if states is not None else None, logits, valid)

    def _segment(self, stack, x, valid, start, end, subsampling, keys, remat, keep, mid_logits):
        """One stack of blocks in one scan: (its output, its mask, its blocks' outputs if `keep`, the mid
        logits if the self-conditioning block is here and `mid_logits`)."""
        cfg = self.config
        mid = cfg.self_conditioning_layer - 1
        conditions = start <= mid < end
        out_valid = halve(valid) if subsampling else valid
        shape = (x.shape[0], out_valid.shape[1])
        logits = jnp.zeros(shape + (cfg.vocab_size,), x.dtype) if conditions and mid_logits else None
        saved = jnp.zeros((end - start,) + shape + (cfg.hidden_size,), x.dtype) if keep else None

        def step(block, carry, layer):
            (x, logits, saved), (i, k) = carry, layer
            x, _, own, here = self.block_step(block, x, valid, i, subsampling, k, remat, with_logits=conditions)
            if saved is not None:
                saved = jax.lax.dynamic_update_index_in_dim(saved, own, i - start, 0)
            if logits is not None:
                logits = jnp.where(i == mid, here, logits)
            return x, logits, saved

        mutable = None if stack.conv.norm.use_running_average else nnx.BatchStat
        if subsampling:  # one block whose output is shorter than its input: no scan, the block itself
            x, logits, saved = _single(stack, step, x, logits, saved, start, keys, mutable)
        else:
            xs = (jnp.arange(start, end), keys)
            x, logits, saved = scan_stacked(stack, step, (x, logits, saved), xs, mutable=mutable)
        return x, out_valid, [] if saved is None else list(saved), logits

    def block_step(
        self,
        block: EncoderBlock,
        x: Float[Array, "b t d"],
        valid: Bool[Array, "b t"],
        i: Array,
        subsampling: bool,
        key: Array | None = None,
        remat: bool = False,
        with_logits: bool = False,
    ) -> tuple[Array, Array, Array, Array | None]:
        """Block i (a traced index) and, when i is the self-conditioning block, that term: (output with
        padding zeroed, its mask, the block's own output as HF's hidden_states keep it (transformers adds the
        self-conditioning afterwards), the self-conditioning logits if `with_logits` (zeros elsewhere))."""
        cfg = self.config

        def call(b, x, v, k):
            return b.subsample(x, v, k) if subsampling else b(x, v, k)

        x = (nnx.remat(call) if remat else call)(block, x, valid, key)
        valid = halve(valid) if subsampling else valid
        own, logits = masked(x, valid), None
        if cfg.self_conditioning_layer > 0:
            mid = cfg.self_conditioning_layer - 1

            def unconditioned(o):
                return o, jnp.zeros(o.shape[:2] + (cfg.vocab_size,), o.dtype)

            x, logits = jax.lax.cond(i == mid, self.self_condition, unconditioned, x)
        return masked(x, valid), valid, own, logits if with_logits else None

    def layer(self, i: int) -> EncoderBlock:
        """Block i (0-based) as a module of its own (a copy of its slice of the stacked weights)."""
        for stack, (start, end, _) in zip(self.layers, segments(self.config), strict=True):
            if start <= i < end:
                graphdef, state = nnx.split(stack)
                return nnx.merge(graphdef, jax.tree.map(lambda a, k=i - start: a[k], state))
        raise IndexError(f"layer {i} out of range for {self.config.num_hidden_layers} layers")


def _single(stack, step, x, logits, saved, index, keys, mutable):
    """`step` on the one block of a stack of one (a subsampling block), its state written back if mutable."""
    graphdef, state = nnx.split(stack)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    out = step(block, (x, logits, saved), (jnp.asarray(index), None if keys is None else keys[0]))
    if mutable is not None:
        nnx.update(stack, jax.tree.map(lambda a: a[None], nnx.state(block, mutable)))
    return out


# -- parameters as flat {path: array} dicts ------------------------------------------------------------------
def _stacking(cfg: Speech5Config) -> Segments:
    return Segments("layers", tuple(start for start, _, _ in segments(cfg)))


def abstract_params(cfg: Speech5Config, *, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    return abstract_variables(lambda: GraniteSpeech5Encoder(cfg, param_dtype=param_dtype), stacked=_stacking(cfg))


def encoder_from_params(
    cfg: Speech5Config,
    params: Mapping[str, np.ndarray],
    *,
    dtype=None,
    param_dtype=jnp.float32,
    consume: bool = False,
    unstacked: dict | None = None,
) -> GraniteSpeech5Encoder:
    return module_from_params(
        lambda: GraniteSpeech5Encoder(cfg, dtype=dtype, param_dtype=param_dtype),
        params,
        consume=consume,
        stacked=_stacking(cfg),
        unstacked=unstacked,
    )


def params_of(model: GraniteSpeech5Encoder) -> dict[str, np.ndarray]:
    return variables_of(model, stacked=_stacking(model.config))
