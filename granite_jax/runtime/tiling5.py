"""Tiled execution of Granite Speech 5's blocks: long inputs in tiles of whole attention blocks.

A Speech 5 block, regular or subsampling, is two halves (the arithmetic of `speech5.EncoderBlock`):
- the attention half (x + ff1/2, + attention) is exact on any whole number of attention blocks, so it runs
  tile by tile in place;
- the conv half (+ conv, + ff2/2, LayerNorm, and the self-conditioning term after its block) needs the
  depthwise conv's halo of neighbouring frames. Each tile reads a window of the attention half's output
  with `left` frames before it and `right` after (past the row's ends: masked as invalid), and writes its
  own output frames into the block's output. A subsampling block's window starts an even number of frames
  early, so that the stride-2 conv's outputs stay centred on the tile's even frames; its residual is pooled
  in pairs per tile.

Memory beyond the weights is then a few hidden-state buffers and one tile's intermediates (the 4x-wide
feed-forward, the 2x-wide conv, the vocabulary-wide self-conditioning logits), whatever the length. The
result equals `block_step`'s. Inference only (BatchNorm on running statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from granite_jax.models.conformer import masked
from granite_jax.models.speech5 import EncoderBlock, GraniteSpeech5Encoder, halve


def attention_half(block: EncoderBlock, x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Array:
    """x + ff1/2, then + attention."""
    x = x + 0.5 * block.feed_forward1(block.norm_feed_forward1(x))
    return x + block.self_attn(block.norm_self_att(x), valid)


def conv_half(
    model: GraniteSpeech5Encoder,
    block: EncoderBlock,
    window: Float[Array, "b w d"],
    valid_w: Bool[Array, "b w"],
    left: int,
    span: int,
    i: Array,
    subsampling: bool,
) -> tuple[Array, Array]:
    """The block's output for the `span` frames of `window` after its first `left` (span // 2 of them when
    subsampling), with the self-conditioning term when i is that block: (output, padding zeroed; its mask)."""
    centre, valid = window[:, left : left + span], valid_w[:, left : left + span]
    conv = block.conv(block.norm_conv(window), valid_w, stride=2 if subsampling else 1)
    if subsampling:  # the window's conv outputs are centred on its even frames; `left` is even
        half = span // 2
        b, _, d = centre.shape
        x = centre.reshape(b, half, 2, d).mean(axis=2) + conv[:, left // 2 : left // 2 + half]
        valid = halve(valid)
    else:
        x = centre + conv[:, left : left + span]
    x = x + 0.5 * block.feed_forward2(block.norm_feed_forward2(x))
    x = block.norm_out(x)
    cfg = model.config
    if cfg.self_conditioning_layer > 0:
        x = jax.lax.cond(i == cfg.self_conditioning_layer - 1, lambda o: model.self_condition(o)[0], lambda o: o, x)
    return masked(x, valid), valid


def tiled_block_step(
    model: GraniteSpeech5Encoder,
    block: EncoderBlock,
    x: Float[Array, "b t d"],
    valid: Bool[Array, "b t"],
    i: Array,
    subsampling: bool,
    span: int,
) -> tuple[Array, Array]:
    """`model.block_step(block, x, valid, i, subsampling)[:2]` (output, padding zeroed; its mask) in tiles of
    `span` frames (a whole number of attention blocks, even). T is padded to whole tiles inside."""
    if not block.conv.norm.use_running_average:
        raise ValueError("tiled execution is for inference (eval mode)")
    b, t, d = x.shape
    per_row = -(-t // span)
    pad = (block.conv.kernel_size - 1) // 2
    left, right = (pad + pad % 2, pad) if subsampling else (pad, pad)  # a subsampling window starts on an even frame
    extra = per_row * span - t
    if extra:  # whole tiles (long inputs come bucketed to whole tiles at the input's resolution)
        x, valid = jnp.pad(x, ((0, 0), (0, extra), (0, 0))), jnp.pad(valid, ((0, 0), (0, extra)))
    tp, num = per_row * span, b * per_row
    valid_p = jnp.pad(valid, ((0, 0), (left, right)))  # frame f at f + left; the halo past a row's ends invalid

    def attend(k, buf):
        r, s = k // per_row, k % per_row * span
        xc = jax.lax.dynamic_slice(buf, (r, s, 0), (1, span, d))
        vc = jax.lax.dynamic_slice(valid, (r, s), (1, span))
        return jax.lax.dynamic_update_slice(buf, attention_half(block, xc, vc).astype(buf.dtype), (r, s, 0))

    y = jax.lax.fori_loop(0, num, attend, x)  # in place
    step = 2 if subsampling else 1
    width = span // step
    out = jnp.zeros((b, per_row * width, d), x.dtype)

    def convolve(k, out):
        r, s = k // per_row, k % per_row * span
        # the halos are gathered (frames past a row's ends clamped, and invalid in valid_w): no padded copy of y
        before = y[r, jnp.clip(s - left + jnp.arange(left), 0, tp - 1)]
        after = y[r, jnp.clip(s + span + jnp.arange(right), 0, tp - 1)]
        window = jnp.concatenate([before, jax.lax.dynamic_slice(y, (r, s, 0), (1, span, d))[0], after])[None]
        valid_w = jax.lax.dynamic_slice(valid_p, (r, s), (1, left + span + right))
        z, _ = conv_half(model, block, window, valid_w, left, span, i, subsampling)
        return jax.lax.dynamic_update_slice(out, z.astype(out.dtype), (r, k % per_row * width, 0))

    out = jax.lax.fori_loop(0, num, convolve, out)
    n = t // step  # a subsampling block drops a trailing odd frame
    valid = valid[:, :t]
    return out[:, :n], (halve(valid) if subsampling else valid)
