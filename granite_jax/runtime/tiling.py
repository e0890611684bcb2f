"""Tiled execution of the 4.x encoder: long inputs in cache-sized tiles, every layer in place.

`encode(model, features, valid, chunk_blocks)` runs `GraniteSpeechEncoder` with the `Tiled` strategy: each
block works through the batch in tiles of about `chunk_blocks` attention blocks' frames (whole rows when
they fit, else whole blocks of one long row), overwriting its input, so the 4x-wide intermediates stay
cache-sized and the compiled encoder holds the hidden states once, whatever the length. The result is the
untiled one. docs/design.md explains the in-place rules this code keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from granite_jax.models.conformer import PLAIN, ConformerBlock, EncoderOutput, GraniteSpeechEncoder, PerFrame, Strategy


class TilePlan(NamedTuple):
    """Tiles of `rows` x `span` frames over a batch padded to (`batch`, `frames`)."""

    rows: int
    span: int
    batch: int
    frames: int


def tile_plan(b: int, t: int, tile_frames: int, context_size: int) -> TilePlan:
    """How a (b, t) batch is cut into equal tiles of about `tile_frames` frames.

    Rows that fit whole are grouped `rows` to a tile: between half as many as fit and all that fit, the number
    that pads the batch least, the larger at a tie (8 rows of which 3 fit: tiles of 2, not 3 and a dummy ninth
    row). Longer rows are cut into tiles of whole blocks, the row padded to whole tiles: the tile count, up to
    twice the fewest, is the one that pads least (30 blocks in tiles of at most 8: 5 x 6, not 4 x 8).
    """
    if t <= tile_frames:
        fit = min(b, max(1, tile_frames // t))
        rows = min(range(-(-fit // 2), fit + 1), key=lambda r: (-(-b // r) * r, -r))
        return TilePlan(rows, t, -(-b // rows) * rows, t)
    c = context_size
    blocks = -(-t // c)
    fewest = -(-blocks // max(1, tile_frames // c))  # tiles per row, at the most blocks per tile
    num = min(range(fewest, 2 * fewest + 1), key=lambda k: (k * -(-blocks // k), k))
    span = -(-blocks // num) * c
    return TilePlan(1, span, b, num * span)


# The block in two halves (the same arithmetic as ConformerBlock.__call__): the first is exact on any
# whole number of attention blocks, the second needs the depthwise conv's halo of neighbouring frames.
def attention_half(block: ConformerBlock, x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Array:
    """x + ff1/2, then + attention."""
    x = 0.5 * block.ff1(x) + x
    return block.attn(x, valid) + x


def conv_half(block: ConformerBlock, xw: Float[Array, "b t+k-1 d"], valid_w: Bool[Array, "b t+k-1"]) -> Array:
    """+ conv, + ff2/2, LayerNorm, on a window that carries the conv halo (returns the centre frames)."""
    left, right = block.conv.depth_conv.padding
    x = block.conv.windowed(xw, valid_w) + xw[:, left : xw.shape[1] - right]
    x = 0.5 * block.ff2(x) + x
    return block.post_norm(x)


class Tiled:
    """The `Strategy` that works through a batch in tiles of about `tile_frames` frames, in place."""

    def __init__(self, tile_frames: int, context_size: int):
        self.tile_frames = tile_frames
        self.context_size = context_size

    def plan(self, b: int, t: int) -> TilePlan | None:
        """The tiles for a (b, t) batch; None when it fits in one."""
        return None if b * t <= self.tile_frames else tile_plan(b, t, self.tile_frames, self.context_size)

    def per_frame(self, fn: PerFrame, x: Float[Array, "b t f"], valid: Bool[Array, "b t"]) -> Array:
        """`fn(x, valid)` tile by tile into one (b, t, w) buffer: a whole-batch result would be one more
        buffer of the whole length."""
        plan = self.plan(*x.shape[:2])
        if plan is None:
            return fn(x, valid)
        b, t, f = x.shape
        per_row = t // plan.span

        def tile(i, out):
            r, s = i // per_row * plan.rows, i % per_row * plan.span
            xc = jax.lax.dynamic_slice(x, (r, s, 0), (plan.rows, plan.span, f))
            vc = jax.lax.dynamic_slice(valid, (r, s), (plan.rows, plan.span))
            return jax.lax.dynamic_update_slice(out, fn(xc, vc).astype(out.dtype), (r, s, 0))

        one = jax.eval_shape(fn, x[:1, :1], valid[:1, :1])  # (1, 1, w)
        out = jnp.zeros((b, t, one.shape[-1]), one.dtype)
        return jax.lax.fori_loop(0, b // plan.rows * per_row, tile, out)

    def block(self, block: ConformerBlock, x: Array, valid: Array, after: PerFrame, key: Array | None = None) -> Array:
        """The block and `after` over the tiles. A batch that the tiles do not divide is padded and cut back
        here (`encode` pads once for all layers instead). Inference only: in train mode BatchNorm would take
        its statistics per tile."""
        if not block.conv.batch_norm.use_running_average or key is not None:
            raise ValueError("tiled execution is for inference (eval mode); train with the Plain or Remat strategy")
        b, t, _ = x.shape
        plan = self.plan(b, t)
        if plan is None:
            return after(block(x, valid), valid)
        extra = ((0, plan.batch - b), (0, plan.frames - t))
        x, valid = jnp.pad(x, extra + ((0, 0),)), jnp.pad(valid, extra)  # no-ops when the tiles fit
        if plan.span == plan.frames:
            return _tiled_rows(block, x, valid, plan.rows, after)[:b]
        return _tiled_time(block, x, valid, plan.span, after)[:b, :t]


def _tiled_rows(block: ConformerBlock, x, valid, rows: int, after: PerFrame) -> Float[Array, "b t d"]:
    """Tiles of whole rows: each tile runs the whole block and overwrites its own rows."""
    halo = ((0, 0), block.conv.depth_conv.padding)

    def tile(i, buf):
        xc = jax.lax.dynamic_slice_in_dim(buf, i * rows, rows)
        vc = jax.lax.dynamic_slice_in_dim(valid, i * rows, rows)
        out = conv_half(block, jnp.pad(attention_half(block, xc, vc), halo + ((0, 0),)), jnp.pad(vc, halo))
        return jax.lax.dynamic_update_slice_in_dim(buf, after(out, vc).astype(buf.dtype), i * rows, 0)

    return jax.lax.fori_loop(0, x.shape[0] // rows, tile, x)


def _tiled_time(block: ConformerBlock, x, valid, span: int, after: PerFrame) -> Float[Array, "b t d"]:
    """Tiles of `span` frames (whole blocks) of one row, in two in-place sweeps.

    The attention half is exact per tile of whole blocks and overwrites x. The conv half of a tile needs the
    attention half of `left` frames before it and `right` after: those after are not yet overwritten when the
    tile runs, those before are, so they are gathered for every tile first. (Carrying them from the previous
    tile instead makes XLA copy the whole buffer in each step.)
    """
    b, t, d = x.shape
    left, right = block.conv.depth_conv.padding
    per_row = t // span
    num = b * per_row
    rows, starts = np.divmod(np.arange(num), per_row)
    starts = starts * span

    def attend_tile(i, buf):
        r, s = i // per_row, i % per_row * span
        xc = jax.lax.dynamic_slice(buf, (r, s, 0), (1, span, d))
        vc = jax.lax.dynamic_slice(valid, (r, s), (1, span))
        return jax.lax.dynamic_update_slice(buf, attention_half(block, xc, vc).astype(buf.dtype), (r, s, 0))

    y = jax.lax.fori_loop(0, num, attend_tile, x)
    # (num, left, d): each tile's left halo; at a row's start clamped frames, masked by valid_p below
    before = y[rows[:, None], np.clip(starts[:, None] - left + np.arange(left), 0, t - 1)]
    valid_p = jnp.pad(valid, ((0, 0), (left, right)))  # frame f at f + left; the halos past the edges False

    def convolve_tile(i, buf):
        r, s = i // per_row, i % per_row * span
        centre = jax.lax.dynamic_slice(buf, (r, s, 0), (1, span, d))
        later = buf[r, jnp.minimum(s + span + jnp.arange(right), t - 1)]  # past the row's end: masked
        window = jnp.concatenate([before[i], centre[0], later])[None]  # (1, left + span + right, d)
        vw = jax.lax.dynamic_slice(valid_p, (r, s), (1, span + left + right))
        out = after(conv_half(block, window, vw), vw[:, left : left + span])
        return jax.lax.dynamic_update_slice(buf, out.astype(buf.dtype), (r, s, 0))

    return jax.lax.fori_loop(0, num, convolve_tile, y)


def strategy(model: GraniteSpeechEncoder, chunk_blocks: int | None) -> Strategy:
    """Tiles of about `chunk_blocks` attention blocks' frames (None: `PLAIN`, untiled)."""
    if chunk_blocks is None:
        return PLAIN
    c = model.config.context_size
    return Tiled(chunk_blocks * c, c)


def pad_to_tiles(
    model: GraniteSpeechEncoder, features: Array, valid: Array, chunk_blocks: int | None
) -> tuple[Strategy, Array, Array]:
    """(the strategy, features, valid) with the batch padded once to whole tiles of about `chunk_blocks`
    attention blocks' frames, for all layers (None: untiled, nothing padded)."""
    tiled = strategy(model, chunk_blocks)
    if chunk_blocks is None:
        return tiled, features, valid
    plan = tiled.plan(*features.shape[:2])
    if plan is not None:
        extra = ((0, plan.batch - features.shape[0]), (0, plan.frames - features.shape[1]))
        features, valid = jnp.pad(features, extra + ((0, 0),)), jnp.pad(valid, extra)
    return tiled, features, valid


def cut_back(out: EncoderOutput, b: int, t: int) -> EncoderOutput:
    """`out` cut back from whole tiles to `b` rows of `t` frames."""
    return out._replace(**{k: v[..., :b, :t, :] for k, v in out._asdict().items() if v is not None and v.ndim >= 3})


def forward(
    model: GraniteSpeechEncoder,
    features: Float[Array, "b t f"],
    valid: Bool[Array, "b t"] | None = None,
    chunk_blocks: int | None = 8,
    **outputs: bool,
) -> EncoderOutput:
    """`model.forward(features, valid, **outputs)` in tiles of about `chunk_blocks` attention blocks' frames
    (None: untiled). The batch is padded once to whole tiles for all layers, and cut back at the end."""
    if chunk_blocks is None:
        return model.forward(features, valid, **outputs)
    b, t = features.shape[:2]
    if valid is None:
        valid = jnp.ones((b, t), bool)
    tiled, features, valid = pad_to_tiles(model, features, valid, chunk_blocks)
    return cut_back(model.forward(features, valid, strategy=tiled, **outputs), b, t)


def encode(
    model: GraniteSpeechEncoder,
    features: Float[Array, "b t f"],
    valid: Bool[Array, "b t"] | None = None,
    chunk_blocks: int | None = 8,
) -> Float[Array, "b t w"]:
    """`model(features, valid)` in tiles of about `chunk_blocks` attention blocks' frames (None: untiled)."""
    return forward(model, features, valid, chunk_blocks).last_hidden_state
