"""The Granite Speech 4.x conformer encoder in Flax NNX: transformers' `GraniteSpeechCTCEncoder`.

The module tree mirrors torch's (input_linear, layers.{ff1, attn, conv, ff2, post_norm}, out, out_mid), so
the checkpoint key table and the per-submodule tests stay one-to-one. The blocks are stacked: `layers` is
one ConformerBlock whose variables carry a leading layer axis, run by one `lax.scan` (XLA compiles one
block, not sixteen); the flat parameter dicts still name every layer (`layers.3.attn.to_q.kernel`).

Every module takes a `valid` mask (B, T), so that a padded batch reproduces each utterance run alone: keys
past a row's length are masked and the depthwise conv sees zeros there, as the unpadded run does.

How a forward pass is scheduled (all at once, in cache-sized tiles for long inputs, rematerialised for
training) is a `Strategy`, passed in by the caller; `tiling.py` holds the tiled one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from granite_jax.checkpoint.params import abstract_variables, module_from_params, variables_of
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.layers import BatchNorm1d, Dropout, accumulator, dense, layer_norm, split_key
from granite_jax.models.stacking import scan_stacked, stacked_modules


def masked(x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Float[Array, "b t d"]:
    """x with the frames past each row's length set to zero."""
    return jnp.where(valid[..., None], x, 0)


class FeedForward(nnx.Module):
    """Pre-norm feed-forward: LayerNorm -> Linear(x mult) -> SiLU -> Linear."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, **kw):
        self.pre_norm = layer_norm(rngs, cfg.hidden_dim, **kw)
        self.up_proj = dense(rngs, cfg.hidden_dim, cfg.hidden_dim * cfg.feedforward_mult, **kw)
        self.down_proj = dense(rngs, cfg.hidden_dim * cfg.feedforward_mult, cfg.hidden_dim, **kw)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x: Float[Array, "b t d"], key: Array | None = None) -> Float[Array, "b t d"]:
        k1, k2 = split_key(key, 2)
        h = self.dropout(nnx.silu(self.up_proj(self.pre_norm(x))), k1)
        return self.dropout(self.down_proj(h), k2)


class Attention(nnx.Module):
    """Block-local multi-head attention with Shaw relative positions.

    The sequence is cut into blocks of `context_size` frames (the last one padded and masked); each frame
    attends within its block. The relative term never forms a (..., c, c, dim_head) product, nor even the
    gathered (c, c, dim_head) table: see `relative_logits`.
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, **kw):
        self.num_heads = cfg.num_heads
        self.dim_head = cfg.dim_head
        self.context_size = cfg.context_size
        self.max_pos_emb = cfg.max_pos_emb
        self.pre_norm = layer_norm(rngs, cfg.hidden_dim, **kw)
        self.to_q = dense(rngs, cfg.hidden_dim, cfg.inner_dim, bias=False, **kw)
        self.to_kv = dense(rngs, cfg.hidden_dim, 2 * cfg.inner_dim, bias=False, **kw)
        self.to_out = dense(rngs, cfg.inner_dim, cfg.hidden_dim, **kw)
        self.rel_pos_emb = nnx.Embed(2 * cfg.max_pos_emb + 1, cfg.dim_head, rngs=rngs, **kw)
        self.dropout = Dropout(cfg.dropout)

    def __call__(
        self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None
    ) -> Float[Array, "b t d"]:
        """Any T: the projections run on the T frames, the block-local core on T padded to whole blocks."""
        # Padded frames are zero after the norm, exactly as the reference's F.pad of normalised states.
        x = masked(self.pre_norm(x), valid)
        k, v = jnp.split(self.to_kv(x), 2, axis=-1)
        out = local_attention(self.to_q(x), k, v, valid, self.num_heads, self.context_size, self.relative_logits)
        return self.dropout(self.to_out(out), key)

    def relative_logits(self, q: Float[Array, "b n h c d"]) -> Float[Array, "b n h c c"]:
        """Shaw term q_i . E[clamp(i - j) + max_pos_emb] (see `shaw_logits`)."""
        return shaw_logits(q, self.rel_pos_emb.embedding[...], self.max_pos_emb)


def local_attention(
    q: Float[Array, "b t hd"],
    k: Float[Array, "b t hd"],
    v: Float[Array, "b t hd"],
    valid: Bool[Array, "b t"],
    num_heads: int,
    context_size: int,
    relative: Callable[[Array], Array],
    weights_dropout: Callable[[Array], Array] | None = None,
) -> Float[Array, "b t hd"]:
    """Block-local attention: T padded to whole blocks of `context_size`, each frame attending within its block
    to the valid keys, logits (q.k + relative(q)) / sqrt(head_dim) with the softmax in fp32.

    Heads are moved ahead of frames once, (b, n, h, c, d), so that every product is a plain batched matmul
    (XLA CPU runs the strided forms at a fraction of the speed); 16-bit inputs are multiplied with fp32 sums.
    """
    b, t, _ = q.shape
    c, h = context_size, num_heads
    n = -(-t // c)
    pad = ((0, 0), (0, n * c - t), (0, 0))
    q, k, v = (jnp.pad(a, pad).reshape(b, n, c, h, -1).transpose(0, 1, 3, 2, 4) for a in (q, k, v))
    acc = accumulator(q.dtype)
    logits = jnp.einsum("bnhqd,bnhkd->bnhqk", q, k, preferred_element_type=acc) + relative(q)  # (b n h c c)
    logits = logits.astype(jnp.float32) * q.shape[-1] ** -0.5
    key_valid = jnp.pad(valid, pad[:2]).reshape(b, n, 1, 1, c)
    logits = jnp.where(key_valid, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if weights_dropout is not None:
        weights = weights_dropout(weights)
    out = jnp.einsum("bnhqk,bnhkd->bnhqd", weights, v, preferred_element_type=acc).astype(v.dtype)
    return out.transpose(0, 1, 3, 2, 4).reshape(b, n * c, -1)[:, :t]  # (b t h*d)


def shaw_logits(q: Float[Array, "b n h c d"], embedding: Float[Array, "p d"], max_pos: int) -> Array:
    """Shaw's relative term q_i . E[clamp(i - j) + max_pos] within each block, without gathering a (c, c, d)
    table: (b, n, h, c, c), summed in fp32 for 16-bit q.

    Within a block i - j only takes the 2c - 1 values -(c-1)..c-1, so q meets those table rows in one
    matmul; then the usual relative shift (pad one column, flatten, re-cut rows of 2c - 1) moves each
    query's row so that column j holds distance i - j.
    """
    b, n, h, c, _ = q.shape
    r = 2 * c - 1
    rows = max_pos + c - 1 - np.arange(r)  # column s <-> distance c - 1 - s (clamp never binds)
    table = embedding[rows].astype(q.dtype)  # (r, d)
    scores = jnp.einsum("bnhqd,rd->bnhqr", q, table, preferred_element_type=accumulator(q.dtype))  # (b n h c r)
    flat = jnp.pad(scores, ((0, 0),) * 4 + ((0, 1),)).reshape(b, n, h, c * (r + 1))
    # Query i's distances i - j for j = 0..c-1 sit at columns c - 1 - i + j: a run of c from flat offset
    # c - 1 + i * r once rows are r + 1 wide.
    return flat[..., c - 1 : c - 1 + c * r].reshape(b, n, h, c, r)[..., :c]


class DepthWiseConv1d(nnx.Module):
    """Depthwise 1-D conv with the reference's (k//2, k//2 - (k+1)%2) zero padding.

    Written as k shifted multiply-adds: XLA's grouped conv is far slower on CPU for the same result.
    `kernel` is (kernel_size, channels); the torch weight is (channels, 1, kernel_size).
    """

    def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, **_):
        self.kernel_size = kernel_size
        pad = kernel_size // 2
        self.padding = (pad, pad - (kernel_size + 1) % 2)
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=())
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype))

    def __call__(self, x: Float[Array, "b t c"]) -> Float[Array, "b t c"]:
        return self.valid(jnp.pad(x, ((0, 0), self.padding, (0, 0))))

    def valid(self, xp: Float[Array, "b t+k-1 c"]) -> Float[Array, "b t c"]:
        """The conv over frames that already carry their `padding` (zeros or neighbouring frames)."""
        return depthwise_taps(xp, self.kernel[...].astype(xp.dtype))


@jax.custom_vjp
def depthwise_taps(xp: Float[Array, "b t+k-1 c"], w: Float[Array, "k c"]) -> Float[Array, "b t c"]:
    """out[:, s] = sum_j xp[:, s + j] * w[j]: a valid depthwise correlation, one tap at a time.

    A loop over the taps, not k slices of one expression: XLA CPU would fuse xp's producer (the GLU) into
    every tap and, inside a while loop, run that fusion many times slower (docs/design.md). Its own backward
    pass: the loop's automatic one would store every tap's (b, t, c) slice.
    """
    k = w.shape[0]
    t = xp.shape[1] - (k - 1)

    def tap(j, out):
        return out + jax.lax.dynamic_slice_in_dim(xp, j, t, axis=1) * w[j]

    return jax.lax.fori_loop(1, k, tap, xp[:, :t] * w[0])


def _depthwise_forward(xp, w):
    return depthwise_taps(xp, w), (xp, w)


def _depthwise_backward(residuals, g):
    xp, w = residuals
    k, t = w.shape[0], g.shape[1]
    # d xp[:, s] = sum_j g[:, s - j] w[j]: the same correlation of g padded by k - 1, with the taps reversed
    dxp = depthwise_taps(jnp.pad(g, ((0, 0), (k - 1, k - 1), (0, 0))), w[::-1])

    def tap(j, dw):  # d w[j] = sum over batch and frames of xp[:, j + s] g[:, s]
        part = jnp.sum(jax.lax.dynamic_slice_in_dim(xp, j, t, axis=1) * g, axis=(0, 1), dtype=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, part.astype(dw.dtype), j, 0)

    return dxp, jax.lax.fori_loop(0, k, tap, jnp.zeros_like(w))


depthwise_taps.defvjp(_depthwise_forward, _depthwise_backward)


class ConvModule(nnx.Module):
    """LayerNorm -> pointwise conv (x2) -> GLU -> depthwise conv -> BatchNorm -> SiLU -> pointwise conv."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, **kw):
        inner = cfg.hidden_dim * cfg.conv_expansion_factor
        self.norm = layer_norm(rngs, cfg.hidden_dim, **kw)
        self.up_conv = dense(rngs, cfg.hidden_dim, 2 * inner, **kw)  # Conv1d(k=1) == Linear
        self.depth_conv = DepthWiseConv1d(inner, cfg.conv_kernel_size, rngs=rngs, **kw)
        self.batch_norm = BatchNorm1d(inner, rngs=rngs, **kw)
        self.down_conv = dense(rngs, inner, cfg.hidden_dim, **kw)
        self.dropout = Dropout(cfg.dropout)

    def __call__(
        self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None
    ) -> Float[Array, "b t d"]:
        pad = ((0, 0), self.depth_conv.padding)
        return self.windowed(jnp.pad(x, pad + ((0, 0),)), jnp.pad(valid, pad), key)

    def windowed(
        self, xw: Float[Array, "b t+k-1 d"], valid_w: Bool[Array, "b t+k-1"], key: Array | None = None
    ) -> Float[Array, "b t d"]:
        """The module on frames that carry the depthwise conv's halo on each side (zeros, or neighbours).

        Everything but the depthwise conv is per frame, so windows that overlap by kernel_size - 1 frames
        give exactly the result on the whole sequence.
        """
        left, right = self.depth_conv.padding
        a, gate = jnp.split(self.up_conv(self.norm(xw)), 2, axis=-1)
        h = masked(a * jax.nn.sigmoid(gate), valid_w)  # GLU; the conv sees zeros past the end, like unpadded
        centre = valid_w[:, left : valid_w.shape[1] - right]  # the output frames (train mode's statistics)
        h = nnx.silu(self.batch_norm(self.depth_conv.valid(h), centre))
        return self.dropout(self.down_conv(h), key)


class ConformerBlock(nnx.Module):
    """Macaron conformer block: x + ff1/2, + attention, + conv, + ff2/2, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, **kw):
        self.ff1 = FeedForward(cfg, rngs=rngs, **kw)
        self.attn = Attention(cfg, rngs=rngs, **kw)
        self.conv = ConvModule(cfg, rngs=rngs, **kw)
        self.ff2 = FeedForward(cfg, rngs=rngs, **kw)
        self.post_norm = layer_norm(rngs, cfg.hidden_dim, **kw)

    def __call__(
        self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], key: Array | None = None
    ) -> Float[Array, "b t d"]:
        k1, k2, k3, k4 = split_key(key, 4)  # dropout, in train mode
        x = 0.5 * self.ff1(x, k1) + x
        x = self.attn(x, valid, k2) + x
        x = self.conv(x, valid, k3) + x
        x = 0.5 * self.ff2(x, k4) + x
        return self.post_norm(x)


PerFrame = Callable[[Array, Array], Array]  # fn(x, valid) -> y, frame by frame


class Strategy(Protocol):
    """How the encoder schedules its work; the result is the same whatever the strategy.

    `per_frame(fn, x, valid)` applies a per-frame function; `block(block, x, valid, after, key)` runs one
    conformer block (`key`: its dropout key in train mode) and then the per-frame `after(out, valid)`.
    """

    def per_frame(self, fn: PerFrame, x: Array, valid: Array) -> Array: ...

    def block(self, block: ConformerBlock, x: Array, valid: Array, after: PerFrame, key: Array | None) -> Array: ...


class Plain:
    """Every stage on the whole batch at once, as the reference runs it."""

    def per_frame(self, fn: PerFrame, x: Array, valid: Array) -> Array:
        return fn(x, valid)

    def block(self, block: ConformerBlock, x: Array, valid: Array, after: PerFrame, key: Array | None) -> Array:
        return after(block(x, valid, key), valid)


PLAIN = Plain()


class EncoderOutput(NamedTuple):
    """What `GraniteSpeechEncoder.forward` returns.

    `last_hidden_state` (B, T, output_width): HF's `last_hidden_state`. `hidden_states` (num_layers + 1, B,
    T, hidden_dim), when asked for: HF's `output_hidden_states`, the input projection then every block's
    output (the self-conditioning block's with its term added, as torch's in-place `+=` gives). HF's last
    entry is its `last_hidden_state`, which for plus is the concatenation (here `last_hidden_state`), and
    HF gives none at all without blocks (here the input projection).
    `mid_logits` (B, T, output_dim), when asked for: the CTC logits `out` computes at the
    self-conditioning block (the intermediate CTC loss's input).
    """

    last_hidden_state: Array
    hidden_states: Array | None = None
    mid_logits: Array | None = None
    valid: Array | None = None  # the output frames' mask, where it differs from the input's (Speech 5)


class GraniteSpeechEncoder(nnx.Module):
    """`GraniteSpeechCTCEncoder` (and the plus variant's `cat_hidden_layers`) in NNX.

    `__call__(features, valid)` takes (B, T, input_dim) and a (B, T) mask of valid frames and returns
    (B, T, output_width) with zeros at invalid frames; T need not be a multiple of context_size. In train
    mode (`model.train()`), `key` drives dropout.
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.input_linear = dense(rngs, cfg.input_dim, cfg.hidden_dim, **kw)
        self.layers = stacked_modules(lambda r: ConformerBlock(cfg, rngs=r, **kw), cfg.num_layers, rngs)
        self.out = dense(rngs, cfg.hidden_dim, cfg.output_dim, **kw)
        self.out_mid = dense(rngs, cfg.output_dim, cfg.hidden_dim, **kw)

    stacking = "layers"  # the flat names' layer axis (nnx_params)

    def ctc_logits(self, hidden: Float[Array, "b t w"]) -> Float[Array, "b t v"]:
        """The CTC head: `out` on the final layer's states (for plus, the last hidden_dim channels)."""
        return self.out(hidden[..., -self.config.hidden_dim :])

    def self_condition(self, x: Float[Array, "b t d"]) -> tuple[Float[Array, "b t d"], Float[Array, "b t v"]]:
        """CTC self-conditioning: (x + out_mid(softmax(out(x))), out(x))."""
        logits = self.out(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        return x + self.out_mid(probs), logits

    def __call__(
        self,
        features: Float[Array, "b t f"],
        valid: Bool[Array, "b t"] | None = None,
        *,
        strategy: Strategy = PLAIN,
        key: Array | None = None,
    ) -> Float[Array, "b t w"]:
        return self.forward(features, valid, strategy=strategy, key=key).last_hidden_state

    def forward(
        self,
        features: Float[Array, "b t f"],
        valid: Bool[Array, "b t"] | None = None,
        *,
        strategy: Strategy = PLAIN,
        key: Array | None = None,
        hidden_states: bool = False,
        mid_logits: bool = False,
    ) -> EncoderOutput:
        """The encoder, with HF's per-layer `hidden_states` and the intermediate CTC logits on request.

        The input projection (`begin`), every block in one scan (`block_step`), the outputs (`finish`): the
        runner calls the same three pieces one block at a time (layerwise.py).
        """
        if valid is None:
            valid = jnp.ones(features.shape[:2], bool)
        keep = self.kept_layers(hidden_states)
        carry, embedded = self.begin(features, valid, strategy, keep, mid_logits)
        if self.config.num_layers:
            mutable = None if self.layers.conv.batch_norm.use_running_average else nnx.BatchStat
            step = functools.partial(self.block_step, valid=valid, strategy=strategy)
            carry = scan_stacked(self.layers, step, carry, self.layer_inputs(keep, key), mutable=mutable)
        return self.finish(embedded, carry, valid, keep, hidden_states)

    def kept_layers(self, hidden_states: bool = False) -> tuple[int, ...]:
        """The 1-based blocks, short of the last, whose outputs are kept: the plus exports, or all of them
        for `hidden_states`."""
        cfg = self.config
        keep = set(range(1, cfg.num_layers + 1)) if hidden_states else set(cfg.exported_layers) - {0}
        return tuple(sorted(keep - {cfg.num_layers}))

    def begin(
        self,
        features: Float[Array, "b t f"],
        valid: Bool[Array, "b t"],
        strategy: Strategy = PLAIN,
        keep: tuple[int, ...] = (),
        mid_logits: bool = False,
    ) -> tuple[tuple, Float[Array, "b t d"]]:
        """The input projection: ((x, kept outputs, mid logits or None), x) for the blocks."""
        cfg = self.config
        if features.shape[-1] != cfg.input_dim:
            raise ValueError(f"features have {features.shape[-1]} channels, the encoder expects {cfg.input_dim}")
        x = strategy.per_frame(lambda f, v: self.input_linear(masked(f, v)), features, valid)
        if not cfg.num_layers:
            x = masked(x, valid)
        saved = jnp.zeros((len(keep),) + x.shape, x.dtype)
        with_logits = mid_logits and cfg.self_conditioning_layer > 0
        logits = jnp.zeros(x.shape[:2] + (cfg.output_dim,), x.dtype) if with_logits else None
        return (x, saved, logits), x

    def layer_inputs(self, keep: tuple[int, ...], key: Array | None = None) -> tuple:
        """What each block's step takes besides the carry, stacked over blocks: (index, its row in the kept
        outputs or -1, its dropout key or None)."""
        cfg = self.config
        slots = np.full(cfg.num_layers, -1, np.int32)  # block (0-based) -> its row in `saved`, or -1
        slots[np.asarray(keep, int) - 1] = np.arange(len(keep))
        keys = jnp.stack(split_key(key, cfg.num_layers)) if key is not None else None
        return np.arange(cfg.num_layers, dtype=np.int32), slots, keys

    def block_step(self, block: ConformerBlock, carry: tuple, layer: tuple, *, valid: Array, strategy: Strategy):
        """Block i, then the self-conditioning if i = num_layers // 2, padding zeroed, the output kept if
        asked: (x, saved, logits) -> the same.

        With `logits` (the mid CTC logits) the self-conditioning runs on the whole batch, not per tile. The
        reference appends an export before its in-place `+=`, so the export at the self-conditioning block
        already includes that term: keeping it after matches.
        """
        (x, saved, logits), (i, slot, k) = carry, layer
        mid = self.config.self_conditioning_layer - 1  # 0-based block; -1: none

        def after(out, valid):
            if mid >= 0 and logits is None:
                out = jax.lax.cond(i == mid, lambda o: self.self_condition(o)[0], lambda o: o, out)
            return masked(out, valid)  # no valid frame reads the padding; zeros keep it finite

        x = strategy.block(block, x, valid, after, k)
        if logits is not None:  # the whole batch at once, keeping the logits

            def unconditioned(o):
                return o, jnp.zeros(o.shape[:2] + (self.config.output_dim,), o.dtype)

            x, here = jax.lax.cond(i == mid, self.self_condition, unconditioned, x)
            x = masked(x, valid)
            logits = jnp.where(i == mid, here, logits)
        if saved.shape[0]:
            saved = jax.lax.cond(
                slot >= 0, lambda s: jax.lax.dynamic_update_index_in_dim(s, x, slot, 0), lambda s: s, saved
            )
        return x, saved, logits

    def finish(
        self,
        embedded: Float[Array, "b t d"],
        carry: tuple,
        valid: Bool[Array, "b t"],
        keep: tuple[int, ...] = (),
        hidden_states: bool = False,
    ) -> EncoderOutput:
        """The outputs from the input projection and the blocks' carry: for plus, the exports in layer
        order then the final layer; `hidden_states` stacked (the input projection zeroed past the lengths
        here; the blocks never read it)."""
        cfg = self.config
        x, saved, logits = carry
        outputs = {0: embedded, cfg.num_layers: x} | {i: saved[j] for j, i in enumerate(keep)}
        last = x
        if cfg.exported_layers:  # plus: [exports in layer order..., final]
            last = masked(jnp.concatenate([outputs[i] for i in cfg.exported_layers] + [x], axis=-1), valid)
        states = None
        if hidden_states:
            states = jnp.stack([masked(outputs[0], valid)] + [outputs[i] for i in range(1, cfg.num_layers + 1)])
        return EncoderOutput(last, states, logits)

    def layer(self, i: int) -> ConformerBlock:
        """Block i (0-based) as a module of its own, holding a copy of its slice of the stacked weights.

        For probing and per-block tests; changes to it do not reach the encoder (edit `layers` for that).
        """
        num = self.config.num_layers
        if not -num <= i < num:
            raise IndexError(f"layer {i} out of range for {num} layers")
        graphdef, stacked = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))


# -- parameters as flat {path: array} dicts (the converter's and the checkpoint's currency) ------------
def abstract_params(cfg: EncoderConfig, *, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of every variable (params and BatchNorm statistics), nothing allocated."""
    return abstract_variables(lambda: GraniteSpeechEncoder(cfg, param_dtype=param_dtype), stacked="layers")


def encoder_from_params(
    cfg: EncoderConfig,
    params: Mapping[str, np.ndarray],
    *,
    dtype=None,
    param_dtype=jnp.float32,
    consume: bool = False,
    unstacked: dict | None = None,
) -> GraniteSpeechEncoder:
    """Build the encoder with the given variables (cast to param_dtype; counters stay integer).

    `params` may be lazy (read on access). With `consume`, each entry is deleted from `params` once it is
    on the device, so the weights are never held twice. `unstacked`: see `module_from_params`.
    """
    return module_from_params(
        lambda: GraniteSpeechEncoder(cfg, dtype=dtype, param_dtype=param_dtype),
        params,
        consume=consume,
        stacked="layers",
        unstacked=unstacked,
    )


def params_of(model: GraniteSpeechEncoder) -> dict[str, np.ndarray]:
    """The model's variables as a flat {path: numpy array} dict."""
    return variables_of(model, stacked="layers")
