"""The relative-position term never materialises a (..., c, c, head_dim) tensor.

In the torch original a broadcast-and-sum built a (batch, blocks, heads, c, c, head_dim) temporary that took
over 10 GB for one granite-speech-4.1-2b forward. Here the compiled encoder's temporary memory, at
production width, is checked to stay far below the size of that tensor. Nothing is allocated: the
encoder is compiled from shapes alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax.models import conformer as modeling
from granite_jax.models.conformer_config import PRODUCTION
from granite_jax.runtime import tiling
from granite_jax.testing import TINY


def _compiled(cfg, batch: int, frames: int, chunk_blocks: int | None = None) -> jax.stages.Compiled:
    model = nnx.eval_shape(lambda: modeling.GraniteSpeechEncoder(cfg))
    graphdef, state = nnx.split(model)

    def forward(state, x, valid):
        return tiling.encode(nnx.merge(graphdef, state), x, valid, chunk_blocks)

    x = jax.ShapeDtypeStruct((batch, frames, cfg.input_dim), jnp.float32)
    valid = jax.ShapeDtypeStruct((batch, frames), jnp.bool_)
    return jax.jit(forward).lower(state, x, valid).compile()


def _memory(cfg, batch: int, frames: int, chunk_blocks: int | None = None):
    return _compiled(cfg, batch, frames, chunk_blocks).memory_analysis()


def _temp_bytes(cfg, batch: int, frames: int, chunk_blocks: int | None = None) -> int:
    return _memory(cfg, batch, frames, chunk_blocks).temp_size_in_bytes


def _six_d_bytes(cfg, batch: int, frames: int) -> int:
    blocks = -(-frames // cfg.context_size)
    return batch * blocks * cfg.num_heads * cfg.context_size**2 * cfg.dim_head * 4


@pytest.mark.parametrize("batch, frames", [(1, 2000), (2, 1437)])
def test_no_six_d_intermediate_at_production_width(batch, frames):
    cfg = dataclasses.replace(PRODUCTION, num_layers=1)
    temp = _temp_bytes(cfg, batch, frames)
    six_d = _six_d_bytes(cfg, batch, frames)
    assert six_d > 1e9  # the tensor we must never build: over 1 GB here
    assert temp < six_d / 10, f"compiled temporaries {temp / 1e6:.0f} MB vs 6-D tensor {six_d / 1e6:.0f} MB"


def test_the_check_can_fail(monkeypatch):
    """A relative term that materialises the 6-D product shows up in the same measurement.

    (XLA fuses a plain broadcast-multiply-sum into a reduction, so the torch original's expression
    would not materialise here; a cumulative sum over d forces the buffer, as eager torch did.)
    """
    cfg = dataclasses.replace(PRODUCTION, num_layers=1)

    def broadcast_relative_logits(self, q):  # (b n h q 1 d) * (q k d), reduced over d through a 6-D buffer
        c = q.shape[3]
        seq = np.arange(c)
        rel = self.rel_pos_emb.embedding[...][np.clip(seq[:, None] - seq[None, :], -c, c) + self.max_pos_emb]
        prod = q[:, :, :, :, None, :] * rel[None, None, None, :, :, :]
        return jax.lax.cumsum(prod, axis=5)[..., -1]

    monkeypatch.setattr(modeling.Attention, "relative_logits", broadcast_relative_logits)
    temp = _temp_bytes(cfg, 1, 2000)
    assert temp > _six_d_bytes(cfg, 1, 2000) / 10


def test_tiled_temporaries_do_not_grow_with_depth_length_or_batch():
    """Tiled inputs (long rows, or many rows): an extra layer adds no hidden-sized buffer, and doubling
    the length or the batch adds about one hidden state per live buffer, not more.

    (A loop buffer built from constants once let XLA allocate every layer's buffers up front: +2 hidden
    states per layer, which this test catches.)
    """
    frames, chunk = 40 * PRODUCTION.context_size, 4  # 40 blocks in tiles of 4
    hidden = frames * PRODUCTION.hidden_dim * 4
    # (From 2 layers: the scan over layers then holds one layer's weights sliced from the stack, 110 MB;
    # a scan of one layer is inlined.)
    two, four = (
        _temp_bytes(dataclasses.replace(PRODUCTION, num_layers=n), 1, frames, chunk_blocks=chunk) for n in (2, 4)
    )
    assert four - two < hidden / 2, f"{(four - two) / 1e6:.0f} MB more for 2 more layers"
    cfg = dataclasses.replace(PRODUCTION, num_layers=1)
    one = _temp_bytes(cfg, 1, frames, chunk_blocks=chunk)
    double = _temp_bytes(cfg, 1, 2 * frames, chunk_blocks=chunk)
    assert double - one < 4 * hidden, f"{(double - one) / 1e6:.0f} MB more for twice the frames"
    unchunked = _temp_bytes(cfg, 1, 2 * frames)
    assert double < unchunked / 2, "tiling should bound the per-layer temporaries"
    rows = _temp_bytes(cfg, 8, frames // 8, chunk_blocks=chunk)  # the same frames as 8 rows
    assert rows - one < hidden, f"8 rows of {frames // 8}: {(rows - one) / 1e6:.0f} MB more than one row"
    assert rows < _temp_bytes(cfg, 8, frames // 8) / 2, "tiling should bound the batch's temporaries too"


@pytest.mark.parametrize("batch, frames", [(1, 400 * PRODUCTION.context_size), (64, 1250)])
def test_tiled_hidden_states_are_held_once(batch, frames):
    """Tiled, the layers (self-conditioning and the output mask included) work in place in the output
    buffer: the temporaries are tile-sized (plus one layer's weights), far below one more copy of the hidden
    states.

    (Two sweeps into separate buffers, a whole-batch input projection, or a loop carry sliced from the
    buffer, which makes XLA copy it every step, each cost one or more hidden-sized buffers.)
    """
    cfg = dataclasses.replace(PRODUCTION, num_layers=3)  # self-conditioning after layer 1
    mem = _memory(cfg, batch, frames, chunk_blocks=8)
    hidden = batch * frames * cfg.hidden_dim * 4
    assert mem.output_size_in_bytes == hidden
    # the scan over layers holds one layer's weights, sliced from the stack (110 MB here)
    params = modeling.abstract_params(cfg).items()
    layer = sum(v.size * v.dtype.itemsize for k, v in params if k.startswith("layers.0."))
    assert mem.temp_size_in_bytes < hidden / 3 + layer, f"temporaries {mem.temp_size_in_bytes / 1e6:.0f} MB"
    # Tiles that do not divide the rows (7 frames short) pad them: then one copy is cut out at the end.
    mem = _memory(cfg, batch, frames - 7, chunk_blocks=8)
    assert mem.temp_size_in_bytes < hidden * 1.3 + layer, f"temporaries {mem.temp_size_in_bytes / 1e6:.0f} MB"


@pytest.mark.parametrize("chunk_blocks", [None, 2])
def test_blocks_are_compiled_once(chunk_blocks):
    """The blocks run as one `lax.scan` over stacked weights: the compiled program holds one block's
    matmuls however deep the encoder (unrolled, XLA CPU compiled every layer again, about 0.1 s each at
    production width), plain or tiled, with the self-conditioning and plus exports in the loop.
    """

    def dots(num_layers: int) -> int:
        cfg = dataclasses.replace(TINY, num_layers=num_layers, cat_hidden_layers=(0, 1, num_layers))
        return _compiled(cfg, 2, 5 * cfg.context_size + 3, chunk_blocks).as_text().count(" dot(")

    two, five = dots(2), dots(5)
    assert two > 0 and two == five, f"{two} matmuls at 2 layers, {five} at 5"


def _speech5_block_memory(frames: int, subsampling: bool, tiled: bool):
    """Compiled from shapes: one production-width Speech 5 block (the self-conditioning one) on `frames` frames."""
    from granite_jax.models.speech5 import EncoderBlock, GraniteSpeech5Encoder
    from granite_jax.models.speech5_config import SPEECH5_PRODUCTION
    from granite_jax.runtime.tiling5 import tiled_block_step

    cfg = SPEECH5_PRODUCTION
    model = nnx.eval_shape(lambda: GraniteSpeech5Encoder(dataclasses.replace(cfg, num_hidden_layers=2)))
    block = nnx.eval_shape(lambda: EncoderBlock(cfg, rngs=nnx.Rngs(0)))
    model.eval()
    block.eval()
    (mdef, mstate), (bdef, bstate) = nnx.split(model), nnx.split(block)
    span = 8 * cfg.context_size  # what chunk_blocks=8 gives (even)

    def run(mstate, bstate, x, valid):
        m, b = nnx.merge(mdef, mstate), nnx.merge(bdef, bstate)
        if tiled:
            return tiled_block_step(m, b, x, valid, jnp.int32(0), subsampling, span)
        return m.block_step(b, x, valid, jnp.int32(0), subsampling)[:2]

    x = jax.ShapeDtypeStruct((1, frames, cfg.hidden_size), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, frames), jnp.bool_)
    return jax.jit(run).lower(mstate, bstate, x, valid).compile().memory_analysis()


@pytest.mark.parametrize("subsampling", [True, False], ids=["subsampling", "regular"])
def test_speech5_tiled_block_holds_hidden_sized_buffers(subsampling):
    """An hour at 50 frames/s is 180,000 frames: the tiled block's temporaries stay within a few hidden-state
    buffers, where the untiled block's 4x-wide feed-forward and vocabulary-wide self-conditioning do not."""
    frames = 30_000
    hidden = frames * 1024 * 4
    tiled = _speech5_block_memory(frames, subsampling, tiled=True).temp_size_in_bytes
    whole = _speech5_block_memory(frames, subsampling, tiled=False).temp_size_in_bytes
    print(f"temporaries, {frames} frames: tiled {tiled / 1e6:.0f} MB, untiled {whole / 1e6:.0f} MB")
    assert tiled < 3 * hidden, tiled
    assert whole > 3 * hidden  # the check can fail: the untiled block is over the bound
