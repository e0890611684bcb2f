"""The Granite Speech conformer encoder in Flax NNX.

The module tree mirrors transformers' `GraniteSpeechCTCEncoder` (input_linear, layers.{ff1, attn, conv, ff2,
post_norm}, out, out_mid), so the checkpoint key table and per-submodule tests stay one-to-one. The blocks
are stacked: `layers` is one ConformerBlock whose variables carry a leading layer axis, run by one
`lax.scan` (XLA compiles one block, not 16), and `layer(i)` gives block i as its own module. The flat
parameter dicts still name every layer (`layers.3.attn.to_q.kernel`), as the reference does.
Every module takes a `valid` mask (B, T) so that a padded batch reproduces each utterance run alone:
keys past a row's length are masked and the depthwise conv sees zeros there, as the unpadded run does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from granite_jax.config import EncoderConfig
from granite_jax.nnx_params import abstract_variables, module_from_params, variables_of

LN_EPS = 1e-5  # torch nn.LayerNorm / nn.BatchNorm1d default


def _dense(rngs: nnx.Rngs, n_in: int, n_out: int, *, bias: bool = True, **kw) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs, **kw)


def _layer_norm(rngs: nnx.Rngs, dim: int, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs, **kw)


class FeedForward(nnx.Module):
    """Pre-norm feed-forward: LayerNorm -> Linear(x mult) -> SiLU -> Linear."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.pre_norm = _layer_norm(rngs, cfg.hidden_dim, **kw)
        self.up_proj = _dense(rngs, cfg.hidden_dim, cfg.hidden_dim * cfg.feedforward_mult, **kw)
        self.down_proj = _dense(rngs, cfg.hidden_dim * cfg.feedforward_mult, cfg.hidden_dim, **kw)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        h = self.up_proj(self.pre_norm(x))
        h = self.dropout(nnx.silu(h))
        return self.dropout(self.down_proj(h))


class Attention(nnx.Module):
    """Block-local multi-head attention with Shaw relative positions.

    The sequence is cut into blocks of `context_size` frames (the last one padded and masked); each frame
    attends within its block. The relative term never forms a (..., c, c, dim_head) product, nor even the
    gathered (c, c, dim_head) table: see `relative_logits`.
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_heads = cfg.num_heads
        self.dim_head = cfg.dim_head
        self.context_size = cfg.context_size
        self.max_pos_emb = cfg.max_pos_emb
        self.pre_norm = _layer_norm(rngs, cfg.hidden_dim, **kw)
        self.to_q = _dense(rngs, cfg.hidden_dim, cfg.inner_dim, bias=False, **kw)
        self.to_kv = _dense(rngs, cfg.hidden_dim, 2 * cfg.inner_dim, bias=False, **kw)
        self.to_out = _dense(rngs, cfg.inner_dim, cfg.hidden_dim, **kw)
        self.rel_pos_emb = nnx.Embed(2 * cfg.max_pos_emb + 1, cfg.dim_head, rngs=rngs, **kw)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True)

    def __call__(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Float[Array, "b t d"]:
        """Any T: the projections run on the T frames, the block-local core on T padded to whole blocks."""
        b, t, _ = x.shape
        c, h = self.context_size, self.num_heads
        n = -(-t // c)
        pad = ((0, 0), (0, n * c - t), (0, 0))
        # Padded frames are zero after the norm, exactly as the reference's F.pad of normalised states.
        x = jnp.where(valid[..., None], self.pre_norm(x), 0)
        q = jnp.pad(self.to_q(x), pad).reshape(b, n, c, h, -1)
        k, v = jnp.split(jnp.pad(self.to_kv(x), pad), 2, axis=-1)
        k = k.reshape(b, n, c, h, -1)
        v = v.reshape(b, n, c, h, -1)
        logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k) + self.relative_logits(q)  # (b n h c c)
        logits = logits.astype(jnp.float32) * self.dim_head**-0.5
        key_valid = jnp.pad(valid, pad[:2]).reshape(b, n, 1, 1, c)
        logits = jnp.where(key_valid, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights, v).reshape(b, n * c, -1)[:, :t]  # (b t h*d)
        return self.dropout(self.to_out(out))

    def relative_logits(self, q: Float[Array, "b n c h d"]) -> Float[Array, "b n h c c"]:
        """Shaw term q_i . E[clamp(i - j) + max_pos_emb] without gathering a (c, c, dim_head) table.

        Within a block i - j only takes the 2c - 1 values -(c-1)..c-1, so q meets those table rows in one
        matmul; then the usual relative shift (pad one column, flatten, re-cut rows of 2c - 1) moves each
        query's row so that column j holds distance i - j.
        """
        b, n, c, h, _ = q.shape
        r = 2 * c - 1
        rows = self.max_pos_emb + c - 1 - np.arange(r)  # column s <-> distance c - 1 - s (clamp never binds)
        table = self.rel_pos_emb.embedding[...][rows].astype(q.dtype)  # (r, d)
        scores = jnp.einsum("bnqhd,rd->bnhqr", q, table)  # (b n h c r): column s = distance c - 1 - s
        flat = jnp.pad(scores, ((0, 0),) * 4 + ((0, 1),)).reshape(b, n, h, c * (r + 1))
        # Query i's distances i - j for j = 0..c-1 sit at columns c - 1 - i + j: a run of c from flat offset
        # c - 1 + i * r once rows are r + 1 wide.
        return flat[..., c - 1 : c - 1 + c * r].reshape(b, n, h, c, r)[..., :c]


class DepthWiseConv1d(nnx.Module):
    """Depthwise 1-D conv with the reference's (k//2, k//2 - (k+1)%2) zero padding.

    Written as k shifted multiply-adds: XLA's grouped conv is far slower on CPU for the same result.
    `kernel` is (kernel_size, channels); the torch weight is (channels, 1, kernel_size).
    """

    def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kernel_size = kernel_size
        pad = kernel_size // 2
        self.padding = (pad, pad - (kernel_size + 1) % 2)
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=())
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype))

    def __call__(self, x: Float[Array, "b t c"]) -> Float[Array, "b t c"]:
        return self.valid(jnp.pad(x, ((0, 0), self.padding, (0, 0))))

    def valid(self, xp: Float[Array, "b t+k-1 c"]) -> Float[Array, "b t c"]:
        """The conv over frames that already carry their `padding` (zeros or neighbouring frames)."""
        t = xp.shape[1] - (self.kernel_size - 1)
        w = self.kernel[...].astype(xp.dtype)

        # A loop over the taps, not k slices of one expression: XLA CPU would fuse xp's producer (the GLU)
        # into every tap and, inside a while loop, run that fusion about 10x slower.
        def tap(j, out):
            return out + jax.lax.dynamic_slice_in_dim(xp, j, t, axis=1) * w[j]

        return jax.lax.fori_loop(1, self.kernel_size, tap, xp[:, :t] * w[0])


class BatchNorm1d(nnx.BatchNorm):
    """`nnx.BatchNorm` over the last axis that also keeps torch's `num_batches_tracked` counter."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kw):
        super().__init__(
            num_features,
            use_running_average=True,  # inference semantics; training mode flips this
            momentum=0.9,  # = torch momentum 0.1
            epsilon=LN_EPS,
            rngs=rngs,
            **kw,
        )
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))


class ConvModule(nnx.Module):
    """LayerNorm -> pointwise conv (x2) -> GLU -> depthwise conv -> BatchNorm -> SiLU -> pointwise conv."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        inner = cfg.hidden_dim * cfg.conv_expansion_factor
        self.norm = _layer_norm(rngs, cfg.hidden_dim, **kw)
        self.up_conv = _dense(rngs, cfg.hidden_dim, 2 * inner, **kw)  # Conv1d(k=1) == Linear
        self.depth_conv = DepthWiseConv1d(inner, cfg.conv_kernel_size, rngs=rngs, param_dtype=param_dtype)
        self.batch_norm = BatchNorm1d(inner, rngs=rngs, **kw)
        self.down_conv = _dense(rngs, inner, cfg.hidden_dim, **kw)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True)

    def __call__(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Float[Array, "b t d"]:
        pad = ((0, 0), self.depth_conv.padding)
        return self.windowed(jnp.pad(x, pad + ((0, 0),)), jnp.pad(valid, pad))

    def windowed(self, xw: Float[Array, "b t+k-1 d"], valid_w: Bool[Array, "b t+k-1"]) -> Float[Array, "b t d"]:
        """The module on the frames of a window that carries the depthwise conv's halo on each side.

        Everything but the depthwise conv is per frame, so a long input can be cut into windows that
        overlap by kernel_size - 1 frames and give exactly the unchunked result.
        """
        a, gate = jnp.split(self.up_conv(self.norm(xw)), 2, axis=-1)
        h = a * jax.nn.sigmoid(gate)  # GLU over channels
        h = jnp.where(valid_w[..., None], h, 0)  # the conv must see zeros past the end, like the unpadded run
        h = nnx.silu(self.batch_norm(self.depth_conv.valid(h)))
        return self.dropout(self.down_conv(h))


class ConformerBlock(nnx.Module):
    """Macaron conformer block: x + ff1/2, + attn, + conv, + ff2/2, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ff1 = FeedForward(cfg, **kw)
        self.attn = Attention(cfg, **kw)
        self.conv = ConvModule(cfg, **kw)
        self.ff2 = FeedForward(cfg, **kw)
        self.post_norm = _layer_norm(rngs, cfg.hidden_dim, dtype=dtype, param_dtype=param_dtype)

    def attend(self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"]) -> Float[Array, "b t d"]:
        """First half: x + ff1/2, then + attention. Exact on any whole number of blocks."""
        x = 0.5 * self.ff1(x) + x
        return self.attn(x, valid) + x

    def convolve(self, xw: Float[Array, "b t+k-1 d"], valid_w: Bool[Array, "b t+k-1"]) -> Float[Array, "b t d"]:
        """Second half on a window with the conv halo: + conv, + ff2/2, LayerNorm (returns the centre)."""
        left, right = self.conv.depth_conv.padding
        x = self.conv.windowed(xw, valid_w) + xw[:, left : xw.shape[1] - right]
        x = 0.5 * self.ff2(x) + x
        return self.post_norm(x)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        valid: Bool[Array, "b t"],
        *,
        tile_frames: int | None = None,
        post: Callable[[Array, Array], Array] | None = None,
    ) -> Float[Array, "b t d"]:
        """The block, then `post(out, valid)` (a per-frame function, e.g. self-conditioning) if given.

        With `tile_frames`, a batch of more frames than that is worked through in tiles of about that many
        (rows of the batch, or whole blocks of one row; see `tile_plan`), in place: the big intermediates
        (4x-wide feed-forward, attention logits) stay cache-sized and no second copy of the hidden states is
        made. Same result as untiled. A batch that the tiles do not divide is padded (and cut back) here;
        `GraniteSpeechEncoder` pads once for all layers instead.
        """
        post = post or (lambda out, _: out)
        b, t, d = x.shape
        if tile_frames is None or b * t <= tile_frames:
            halo = ((0, 0), self.conv.depth_conv.padding)
            out = self.convolve(jnp.pad(self.attend(x, valid), halo + ((0, 0),)), jnp.pad(valid, halo))
            return post(out, valid)
        plan = tile_plan(b, t, tile_frames, self.attn.context_size)
        extra = ((0, plan.batch - b), (0, plan.frames - t))
        x, valid = jnp.pad(x, extra + ((0, 0),)), jnp.pad(valid, extra)  # no-ops when the tiles fit
        if plan.span == plan.frames:
            return self._tiled_rows(x, valid, plan.rows, post)[:b]
        return self._tiled_time(x, valid, plan.span, post)[:b, :t]

    def _tiled_rows(self, x, valid, rows: int, post) -> Float[Array, "b t d"]:
        """Tiles of whole rows: each tile runs the whole block and overwrites its own rows."""
        b, t, d = x.shape
        halo = ((0, 0), self.conv.depth_conv.padding)

        def tile(i, buf):
            xc = jax.lax.dynamic_slice_in_dim(buf, i * rows, rows)
            vc = jax.lax.dynamic_slice_in_dim(valid, i * rows, rows)
            out = self.convolve(jnp.pad(self.attend(xc, vc), halo + ((0, 0),)), jnp.pad(vc, halo))
            return jax.lax.dynamic_update_slice_in_dim(buf, post(out, vc).astype(buf.dtype), i * rows, 0)

        return jax.lax.fori_loop(0, b // rows, tile, x)

    def _tiled_time(self, x, valid, span: int, post) -> Float[Array, "b t d"]:
        """Tiles of `span` frames (whole blocks) of one row, in two in-place sweeps.

        The attention half is exact per tile of whole blocks and overwrites x. The conv half of a tile
        needs the attention half of `left` frames before it and `right` after: those after are not yet
        overwritten when the tile runs, those before are, so they are gathered for every tile first.
        (Carrying them from the previous tile instead makes XLA copy the whole buffer in each step.)
        """
        b, t, d = x.shape
        left, right = self.conv.depth_conv.padding
        per_row = t // span
        num = b * per_row
        rows, starts = np.divmod(np.arange(num), per_row)
        starts = starts * span

        def attend_tile(i, buf):
            r, s = i // per_row, i % per_row * span
            xc = jax.lax.dynamic_slice(buf, (r, s, 0), (1, span, d))
            vc = jax.lax.dynamic_slice(valid, (r, s), (1, span))
            return jax.lax.dynamic_update_slice(buf, self.attend(xc, vc).astype(buf.dtype), (r, s, 0))

        y = jax.lax.fori_loop(0, num, attend_tile, x)
        # (num, left, d): each tile's left halo; at a row's start clamped frames, masked by valid_p below
        before = y[rows[:, None], np.clip(starts[:, None] - left + np.arange(left), 0, t - 1)]
        valid_p = jnp.pad(valid, ((0, 0), (left, right)))  # frame f at f + left; the halos past the edges False

        def convolve_tile(i, buf):
            r, s = i // per_row, i % per_row * span
            centre = jax.lax.dynamic_slice(buf, (r, s, 0), (1, span, d))
            after = buf[r, jnp.minimum(s + span + jnp.arange(right), t - 1)]  # past the row's end: masked
            window = jnp.concatenate([before[i], centre[0], after])[None]  # (1, left + span + right, d)
            vw = jax.lax.dynamic_slice(valid_p, (r, s), (1, span + left + right))
            out = post(self.convolve(window, vw), vw[:, left : left + span])
            return jax.lax.dynamic_update_slice(buf, out.astype(buf.dtype), (r, s, 0))

        return jax.lax.fori_loop(0, num, convolve_tile, y)


class TilePlan(NamedTuple):
    """Tiles of `rows` x `span` frames over a batch padded to (`batch`, `frames`)."""

    rows: int
    span: int
    batch: int
    frames: int


def tile_plan(b: int, t: int, tile_frames: int, context_size: int) -> TilePlan:
    """How a (b, t) batch is cut into equal tiles of about `tile_frames` frames.

    Rows that fit whole are grouped `rows` to a tile (the batch padded to a multiple of `rows`). Longer rows
    are cut into tiles of whole blocks, the row padded to whole tiles: the tile count, up to twice the
    fewest, is the one that pads least (30 blocks in tiles of at most 8: 5 x 6, not 4 x 8).
    """
    if t <= tile_frames:
        rows = min(b, max(1, tile_frames // t))
        return TilePlan(rows, t, -(-b // rows) * rows, t)
    c = context_size
    blocks = -(-t // c)
    fewest = -(-blocks // max(1, tile_frames // c))  # tiles per row, at the most blocks per tile
    num = min(range(fewest, 2 * fewest + 1), key=lambda k: (k * -(-blocks // k), k))
    span = -(-blocks // num) * c
    return TilePlan(1, span, b, num * span)


class GraniteSpeechEncoder(nnx.Module):
    """`GraniteSpeechCTCEncoder` (and the plus variant's `cat_hidden_layers`) in NNX.

    `__call__(features, valid)` takes (B, T, input_dim) and a (B, T) mask of valid frames and returns
    (B, T, output_width) with zeros at invalid frames. T need not be a multiple of context_size.
    `chunk_blocks`: work through the batch in tiles of about that many blocks' frames in every layer (rows
    of the batch, or whole blocks of one long row), so that the big intermediates stay cache-sized and
    memory beyond the hidden states stays flat however long the audio (same result; see ConformerBlock).
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.input_linear = _dense(rngs, cfg.input_dim, cfg.hidden_dim, **kw)
        self.layers = _stacked_blocks(cfg, rngs, **kw) if cfg.num_layers else None
        self.out = _dense(rngs, cfg.hidden_dim, cfg.output_dim, **kw)
        self.out_mid = _dense(rngs, cfg.output_dim, cfg.hidden_dim, **kw)

    def self_condition(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        """CTC self-conditioning: x + out_mid(softmax(out(x)))."""
        probs = jax.nn.softmax(self.out(x).astype(jnp.float32), axis=-1).astype(x.dtype)
        return x + self.out_mid(probs)

    def __call__(
        self,
        features: Float[Array, "b t f"],
        valid: Bool[Array, "b t"] | None = None,
        *,
        chunk_blocks: int | None = None,
    ) -> Float[Array, "b t w"]:
        cfg = self.config
        b, t, f = features.shape
        if f != cfg.input_dim:
            raise ValueError(f"features have {f} channels, the encoder expects input_dim={cfg.input_dim}")
        if valid is None:
            valid = jnp.ones((b, t), bool)
        tile = chunk_blocks * cfg.context_size if chunk_blocks else None
        plan = tile_plan(b, t, tile, cfg.context_size) if tile is not None and b * t > tile else None
        if plan is not None:  # pad once to whole tiles for all layers (see ConformerBlock)
            extra = ((0, plan.batch - b), (0, plan.frames - t))
            features = jnp.pad(features, extra + ((0, 0),))
            valid = jnp.pad(valid, extra)

        def mask(x, valid):  # invalid frames are zeros (input and output)
            return jnp.where(valid[..., None], x, 0)

        def project_in(features, valid):
            return self.input_linear(mask(features, valid))

        # Tiled, the input projection too goes tile by tile: a whole-batch matmul's result (or masked
        # features) would be one more buffer of the whole length.
        x = project_in(features, valid) if plan is None else _per_tile(project_in, features, valid, plan)
        exported = [x] if 0 in cfg.exported_layers else []
        later = [i for i in cfg.exported_layers if i > 0]
        if self.layers is not None:
            x, saved = self._run_layers(x, valid, tile, later)
            exported += [saved[k] for k in range(saved.shape[0])] + ([x] if cfg.num_layers in later else [])
        if exported:
            x = mask(jnp.concatenate(exported + [x], axis=-1), valid)
        elif self.layers is None:
            x = mask(x, valid)
        return x[:b, :t]

    def _run_layers(
        self, x: Float[Array, "b t d"], valid: Bool[Array, "b t"], tile: int | None, export: list[int]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "e b t d"]]:
        """All blocks, as one `lax.scan` over the stacked layers (compiled once, not once per layer).

        Returns the last block's output and the outputs of the (1-based) blocks in `export` before the last.
        Per-frame work after a block runs tile by tile inside it (`post`), with no extra copy of the hidden
        states: the self-conditioning after its block, and zeroing the invalid frames after every block
        (which no valid frame sees: keys past a row's end are masked and the conv reads zeros there).
        """
        cfg = self.config
        num = cfg.num_layers
        graphdef, stacked = nnx.split(self.layers)
        # slot of block i (0-based) in `saved`, or -1; the last block's output is x itself
        slots = np.full(num, -1, np.int32)
        for k, i in enumerate(i for i in export if i < num):
            slots[i - 1] = k
        saved = jnp.zeros((int((slots >= 0).sum()),) + x.shape, x.dtype)
        conditioned = cfg.self_conditioning_layer - 1  # 0-based block; -1 for none

        def step(carry, layer):
            x, saved = carry
            i, state = layer
            block = nnx.merge(graphdef, state)

            def post(out, valid):
                if conditioned >= 0:
                    # The reference appends its export before an in-place `+=`, so the export at this
                    # block already includes the self-conditioning term: taking it after matches that.
                    out = jax.lax.cond(i == conditioned, self.self_condition, lambda o: o, out)
                return jnp.where(valid[..., None], out, 0)

            x = block(x, valid, tile_frames=tile, post=post)
            if saved.shape[0]:
                slot = jnp.asarray(slots)[i]
                saved = jax.lax.cond(
                    slot >= 0, lambda s: jax.lax.dynamic_update_index_in_dim(s, x, slot, 0), lambda s: s, saved
                )
            return (x, saved), None

        (x, saved), _ = jax.lax.scan(step, (x, saved), (jnp.arange(num), stacked))
        return x, saved

    def layer(self, i: int) -> ConformerBlock:
        """Block i (0-based) as a module of its own, holding a copy of its slice of the stacked weights.

        For probing and per-block tests; changes to it do not reach the encoder.
        """
        num = self.config.num_layers
        if not -num <= i < num:
            raise IndexError(f"layer {i} out of range for {num} layers")
        graphdef, stacked = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))


def _stacked_blocks(cfg: EncoderConfig, rngs: nnx.Rngs, **kw) -> ConformerBlock:
    """`cfg.num_layers` ConformerBlocks as one, each variable with a leading layer axis (for `lax.scan`)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> ConformerBlock:
        return ConformerBlock(cfg, rngs=rngs, **kw)

    return make(rngs)


def _per_tile(
    fn: Callable, x: Float[Array, "b t f"], valid: Bool[Array, "b t"], plan: TilePlan
) -> Float[Array, "b t w"]:
    """A per-frame `fn(x, valid)` over `plan`'s tiles of x, written into one (b, t, w) buffer."""
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
) -> GraniteSpeechEncoder:
    """Build the encoder with the given variables (cast to param_dtype; counters stay integer).

    `params` may be lazy (read on access). With `consume`, each entry is deleted from `params` once it is
    on the device, so the weights are never held twice.
    """
    return module_from_params(
        lambda: GraniteSpeechEncoder(cfg, dtype=dtype, param_dtype=param_dtype),
        params,
        consume=consume,
        stacked="layers",
    )


def params_of(model: GraniteSpeechEncoder) -> dict[str, np.ndarray]:
    """The model's variables as a flat {path: numpy array} dict."""
    return variables_of(model, stacked="layers")
