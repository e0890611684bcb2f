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
import pytest
from flax import nnx

from granite_jax import modeling
from granite_jax.config import PRODUCTION


def _temp_bytes(cfg, batch: int, frames: int, chunk_blocks: int | None = None) -> int:
    model = nnx.eval_shape(lambda: modeling.GraniteSpeechEncoder(cfg))
    graphdef, state = nnx.split(model)

    def forward(state, x, valid):
        return nnx.merge(graphdef, state)(x, valid, chunk_blocks=chunk_blocks)

    x = jax.ShapeDtypeStruct((batch, frames, cfg.input_dim), jnp.float32)
    valid = jax.ShapeDtypeStruct((batch, frames), jnp.bool_)
    compiled = jax.jit(forward).lower(state, x, valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes


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
    real_einsum = jnp.einsum

    def broadcast_einsum(spec, a, b, **kw):
        if spec == "bnqhd,qkd->bnhqk":  # (b n q h 1 d) * (q k d), reduced over d through a 6-D buffer
            prod = a[:, :, :, :, None, :] * b[None, None, :, None, :, :]
            return jnp.transpose(jax.lax.cumsum(prod, axis=5)[..., -1], (0, 1, 3, 2, 4))
        return real_einsum(spec, a, b, **kw)

    monkeypatch.setattr(modeling.jnp, "einsum", broadcast_einsum)
    temp = _temp_bytes(cfg, 1, 2000)
    assert temp > _six_d_bytes(cfg, 1, 2000) / 10


def test_chunked_temporaries_do_not_grow_with_depth_or_chunk_count():
    """Chunked long inputs: each extra layer adds only its (c, c, head_dim) position table (20 MB), not
    hidden-sized buffers, and doubling the length adds about one hidden state per live buffer, not more.

    (A loop buffer built from constants once let XLA allocate every layer's buffers up front: +2 hidden
    states per layer, which this test catches.)
    """
    frames, chunk = 40 * PRODUCTION.context_size, 4  # 40 blocks in chunks of 4
    hidden = frames * PRODUCTION.hidden_dim * 4
    table = PRODUCTION.context_size**2 * PRODUCTION.dim_head * 4
    one, three = (
        _temp_bytes(dataclasses.replace(PRODUCTION, num_layers=n), 1, frames, chunk_blocks=chunk) for n in (1, 3)
    )
    assert three - one < 2 * table + hidden / 2, f"{(three - one) / 1e6:.0f} MB more for 2 more layers"
    cfg = dataclasses.replace(PRODUCTION, num_layers=1)
    double = _temp_bytes(cfg, 1, 2 * frames, chunk_blocks=chunk)
    assert double - one < 4 * hidden, f"{(double - one) / 1e6:.0f} MB more for twice the frames"
    unchunked = _temp_bytes(cfg, 1, 2 * frames)
    assert double < unchunked / 2, "chunking should bound the per-layer temporaries"
