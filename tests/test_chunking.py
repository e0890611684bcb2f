"""Batches run tile by tile inside each layer (bounded memory) and give the untiled result."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY, convert_cli, make_hf_checkpoint, rel_err, requires_torch, torch_encode
from flax import nnx

import granite_jax
from granite_jax.modeling import GraniteSpeechEncoder, tile_plan

CONFIGS = {
    "tiny": TINY,
    "even-kernel-plus": dataclasses.replace(TINY, conv_kernel_size=4, cat_hidden_layers=(0, 2)),
    "kernel-1": dataclasses.replace(TINY, conv_kernel_size=1, num_layers=1),
    "kernel-wider-than-block": dataclasses.replace(TINY, conv_kernel_size=19, context_size=4, max_pos_emb=6),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunk_blocks", [1, 2, 3, 4, 20])
def test_chunked_equals_unchunked(name, chunk_blocks):
    cfg = CONFIGS[name]
    model = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(1))
    t = 11 * cfg.context_size - 3  # 11 blocks: chunks of 2, 3 and 4 blocks do not divide it
    x = np.random.default_rng(0).standard_normal((3, t, cfg.input_dim)).astype(np.float32)
    valid = np.arange(t)[None] < np.array([t, 5 * cfg.context_size + 1, 2])[:, None]
    want = jax.jit(lambda a, v: model(a, v))(x, valid)
    got = jax.jit(lambda a, v: model(a, v, chunk_blocks=chunk_blocks))(x, valid)
    assert rel_err(got, want) < 1e-5
    assert not np.asarray(got)[~valid].any()


@pytest.mark.parametrize("b,t", [(1, 11 * 8), (3, 11 * 8), (5, 24), (7, 8), (2, 8 * 9)])
@pytest.mark.parametrize("tile", [8, 16, 24, 40, 1000])
def test_tile_plan_covers_every_frame_once_or_more(b, t, tile):
    """Tiles are equal, lie inside the batch, cover every frame, and long rows are cut at block edges."""
    rows, span, starts = tile_plan(b, t, tile, context_size=8)
    covered = np.zeros((b, t), int)
    for r, s in starts:
        assert 0 <= r <= b - rows and 0 <= s <= t - span
        covered[r : r + rows, s : s + span] += 1
        assert span == t or s % 8 == 0
    assert covered.min() >= 1
    assert rows * span <= max(tile, t) or rows == 1


def test_long_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="whole blocks"):
        tile_plan(1, 8 * 5 + 1, 16, context_size=8)


@requires_torch
@pytest.mark.parametrize("t_blocks,rem", [(9, 0), (9, 1), (13, -1)])
def test_chunked_against_torch(tmp_path_factory, t_blocks, rem):
    """Through `load(chunk_blocks=2)`, a 9-13 block input matches the HF encoder (T % c in {0, 1, c-1})."""
    cfg = dataclasses.replace(TINY, conv_kernel_size=6, cat_hidden_layers=(1,))
    d = tmp_path_factory.mktemp("chunk")
    ref = make_hf_checkpoint(cfg, d / "hf", seed=5)
    convert_cli(d / "hf", d / "gj")
    model = granite_jax.load(d / "gj", chunk_blocks=2)
    t = t_blocks * cfg.context_size + rem
    x = np.random.default_rng(t).standard_normal((2, t, cfg.input_dim)).astype(np.float32)
    got = np.asarray(model.encode_features(x, lengths=[t, t - 2 * cfg.context_size]))
    assert rel_err(got[0], torch_encode(ref, x[:1])[0]) < 1e-4
    short = t - 2 * cfg.context_size
    assert rel_err(got[1, :short], torch_encode(ref, x[1:2, :short])[0]) < 1e-4


def test_load_rejects_bad_chunk_blocks(tmp_path):
    from granite_jax.api import GraniteEncoder

    with pytest.raises(ValueError, match="chunk_blocks"):
        GraniteEncoder(GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0)), chunk_blocks=0)
