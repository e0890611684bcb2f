"""Batches run tile by tile inside each layer (bounded memory) and give the untiled result."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import granite_jax
from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.runtime.tiling import Tiled, tile_plan
from granite_jax.runtime.tiling import encode as tiled_encode
from granite_jax.testing import TINY, convert_cli, rel_err, torch_encode
from granite_jax.testing.hf import make_hf_checkpoint

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
    got = jax.jit(lambda a, v: tiled_encode(model, a, v, chunk_blocks))(x, valid)
    assert rel_err(got, want) < 1e-5
    assert not np.asarray(got)[~valid].any()


def test_rows_grouped_with_a_dummy_row_equal_unchunked():
    """Seven short rows of mixed lengths, three fitting a tile: tiles of two rows and one dummy row, as untiled."""
    cfg = TINY
    model = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(2))
    b, t, chunk_blocks = 7, 3 * cfg.context_size - 1, 10
    plan = tile_plan(b, t, chunk_blocks * cfg.context_size, cfg.context_size)
    print(f"plan {plan}")
    assert (plan.rows, plan.batch) == (2, 8)
    x = np.random.default_rng(3).standard_normal((b, t, cfg.input_dim)).astype(np.float32)
    valid = np.arange(t)[None] < np.array([t, 1, t - 1, cfg.context_size, cfg.context_size + 1, 2, t])[:, None]
    want = jax.jit(lambda a, v: model(a, v))(x, valid)
    got = jax.jit(lambda a, v: tiled_encode(model, a, v, chunk_blocks))(x, valid)
    assert rel_err(got, want) < 1e-5
    assert not np.asarray(got)[~valid].any()


@pytest.mark.parametrize("b,t", [(1, 11 * 8), (3, 11 * 8), (5, 24), (7, 8), (2, 8 * 9), (1, 8 * 5 + 1)])
@pytest.mark.parametrize("tile", [8, 16, 24, 40, 1000])
def test_tile_plan(b, t, tile):
    """Equal tiles of at most max(tile, a row) frames; long rows cut at block edges; padding under one tile."""
    plan = tile_plan(b, t, tile, context_size=8)
    assert plan.batch % plan.rows == 0 and plan.frames % plan.span == 0
    assert b <= plan.batch < b + plan.rows and t <= plan.frames
    if t <= tile:
        assert plan.span == t == plan.frames and plan.rows * t <= tile or plan.rows == 1
    else:
        assert plan.rows == 1 and plan.span % 8 == 0 and plan.span <= max(tile, 8)
        assert plan.frames - t < plan.span + 8 and plan.frames - 8 * -(-t // 8) < plan.span


def test_tile_plan_pads_least():
    assert tile_plan(1, 30 * 8, 64, 8) == (1, 6 * 8, 1, 30 * 8)  # 5 tiles of 6 blocks, not 4 of 8
    assert tile_plan(1, 960 * 200, 1600, 200) == (1, 1600, 1, 960 * 200)  # an hour: 120 tiles, no padding
    assert tile_plan(3, 600, 1600, 200) == (1, 600, 3, 600)  # rows one by one, not in twos with a dummy row
    assert tile_plan(8, 500, 1600, 200) == (2, 500, 8, 500)  # in twos, not in threes with a dummy ninth row
    assert tile_plan(7, 500, 1600, 200) == (2, 500, 8, 500)  # one dummy row, not two
    assert tile_plan(6, 500, 1600, 200) == (3, 500, 6, 500)
    assert tile_plan(37, 50, 1600, 200) == (19, 50, 38, 50)  # tiles no narrower than half the widest


def test_tile_plan_never_pads_more_than_full_tiles():
    """Whole rows: never more padding than tiles filled with as many rows as fit, nor tiles under half as wide."""
    for tile in (64, 1600):
        for t in (8, 24, 50, 200, 500, tile):
            for b in range(1, 41):
                fit = min(b, max(1, tile // t))
                plan = tile_plan(b, t, tile, 8)
                assert plan.batch <= -(-b // fit) * fit and -(-fit // 2) <= plan.rows <= fit, (b, t, tile, plan)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("t", [5 * 8 - 3, 5 * 8, 5 * 8 + 1])
@pytest.mark.parametrize("kernel", [4, 15])
def test_block_tiles_in_place(rows, t, kernel):
    """One block, tiled (row tiles and time tiles, with padding to whole tiles), equals it untiled."""
    cfg = dataclasses.replace(TINY, conv_kernel_size=kernel, context_size=8, max_pos_emb=10)
    block = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(3)).layer(0)
    x = np.random.default_rng(t).standard_normal((rows, t, cfg.hidden_dim)).astype(np.float32)
    valid = np.arange(t)[None] < np.array([t, t - 9, 3])[:rows, None]
    want = np.asarray(jax.jit(lambda a, v: block(a, v))(x, valid))
    for tile in (8, 16, 24, 2 * t):
        got = np.asarray(
            jax.jit(lambda a, v, tile=tile: Tiled(tile, cfg.context_size).block(block, a, v, lambda o, _: o))(x, valid)
        )
        assert got.shape == want.shape and rel_err(got, want) < 1e-5, tile


@pytest.mark.torch
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
    from granite_jax.runtime.runner import Runner

    with pytest.raises(ValueError, match="chunk_blocks"):
        Runner(GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0)), chunk_blocks=0)
