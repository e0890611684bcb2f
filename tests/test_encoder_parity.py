"""Whole-encoder parity against transformers' GraniteSpeech(Plus)CTCEncoder, through the real converter CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import granite_jax
from granite_jax.models.conformer_config import PRODUCTION
from granite_jax.testing import TINY, convert_cli, rel_err, torch_encode
from granite_jax.testing.hf import make_hf_checkpoint

pytestmark = pytest.mark.torch
TOL = 1e-4  # of max |reference|, fp32

CONFIGS = {
    "tiny": TINY,
    "zero_layers": dataclasses.replace(TINY, num_layers=0, cat_hidden_layers=(0,)),
    "one_layer": dataclasses.replace(TINY, num_layers=1),  # num_layers // 2 == 0: no self-conditioning
    "two_layers": dataclasses.replace(TINY, num_layers=2),  # self-conditioning after block 1
    "five_layers_even_kernel": dataclasses.replace(TINY, num_layers=5, conv_kernel_size=4),
    "kernel_2": dataclasses.replace(TINY, conv_kernel_size=2),
    "kernel_1": dataclasses.replace(TINY, conv_kernel_size=1),
    "inner_ne_hidden": dataclasses.replace(TINY, num_heads=3, dim_head=8),  # 24 != 32
    "context_eq_max_pos": dataclasses.replace(TINY, context_size=10, max_pos_emb=10),
    "context_1": dataclasses.replace(TINY, context_size=1, num_layers=2),
    "expansion_3_mult_3": dataclasses.replace(TINY, conv_expansion_factor=3, feedforward_mult=3),
    "plus": dataclasses.replace(TINY, num_layers=4, cat_hidden_layers=(3, 1)),
    "plus_zero_and_mid": dataclasses.replace(TINY, num_layers=4, cat_hidden_layers=(0, 2)),  # 2 == 4 // 2
    "plus_last_and_dupes": dataclasses.replace(TINY, num_layers=3, cat_hidden_layers=(3, 1, 1, 0)),
    "plus_empty": dataclasses.replace(TINY, cat_hidden_layers=()),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (torch reference, granite_jax encoder), built once per config."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = CONFIGS[name]
            d = tmp_path_factory.mktemp(name)
            ref = make_hf_checkpoint(cfg, d / "hf", seed=list(CONFIGS).index(name))
            convert_cli(d / "hf", d / "gj")
            cache[name] = (ref, granite_jax.load(d / "gj"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_across_remainders(converted, name):
    ref, model = converted(name)
    c = CONFIGS[name].context_size
    rng = np.random.default_rng(1)
    for t in sorted({1, c - 1, c, c + 1, 3 * c, 3 * c + 1, 2 * c - 1} - {0}):
        x = rng.standard_normal((2, t, CONFIGS[name].input_dim)).astype(np.float32)
        got = np.asarray(model.encode_features(x))
        want = torch_encode(ref, x)
        assert got.shape == want.shape, (t, got.shape, want.shape)
        assert rel_err(got, want) < TOL, f"T={t}: {rel_err(got, want):.2e}"


def test_plus_width_and_order(converted):
    """The plus output is [exports in layer order..., final], so its width is hidden x (n + 1)."""
    ref, model = converted("plus_last_and_dupes")
    assert model.config.output_width == 4 * TINY.hidden_dim  # {0, 1, 3} + final
    x = np.random.default_rng(2).standard_normal((1, 11, TINY.input_dim)).astype(np.float32)
    got = np.asarray(model.encode_features(x))
    assert got.shape == (1, 11, 4 * TINY.hidden_dim)
    # the last export (layer 3 == num_layers) equals the final hidden states
    np.testing.assert_array_equal(got[..., 2 * 32 : 3 * 32], got[..., 3 * 32 :])


def test_2d_input_is_one_utterance(converted):
    ref, model = converted("tiny")
    x = np.random.default_rng(3).standard_normal((13, TINY.input_dim)).astype(np.float32)
    got = np.asarray(model.encode_features(x))
    assert got.shape == (13, TINY.hidden_dim)
    assert rel_err(got, torch_encode(ref, x[None])[0]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("t", [437, 400])
def test_production_width_two_layers(tmp_path, t):
    """Real widths (1024 hidden, 8 x 128 heads, c = 200, kernel 15), 2 layers, T around 437 and T % c == 0."""
    cfg = dataclasses.replace(PRODUCTION, num_layers=2)
    ref = make_hf_checkpoint(cfg, tmp_path / "hf", seed=5)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    x = np.random.default_rng(4).standard_normal((2, t, cfg.input_dim)).astype(np.float32)
    err = rel_err(model.encode_features(x), torch_encode(ref, x))
    assert err < TOL, err


def test_hf_directory_loads_directly(tmp_path):
    """`load` on an HF checkpoint converts in memory; the result equals the CLI-converted one."""
    ref = make_hf_checkpoint(TINY, tmp_path / "hf", seed=9)
    model = granite_jax.load(tmp_path / "hf")
    x = np.random.default_rng(5).standard_normal((1, 19, TINY.input_dim)).astype(np.float32)
    assert rel_err(model.encode_features(x), torch_encode(ref, x)) < TOL
    assert model.provenance["source_prefix"] == ""


def test_bfloat16_load_runs_close_to_fp32(tmp_path):
    """`load(..., dtype="bfloat16")` computes in bf16 (softmax in fp32); a coarse check until the bf16 mode
    gets its measured error budget."""
    ref = make_hf_checkpoint(TINY, tmp_path / "hf", seed=12)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj", dtype="bfloat16")
    x = np.random.default_rng(6).standard_normal((2, 21, TINY.input_dim)).astype(np.float32)
    got = model.encode_features(x, lengths=[21, 9])
    assert got.dtype == np.dtype("bfloat16")
    want = torch_encode(ref, x[:1])
    assert rel_err(np.asarray(got[:1], np.float32), want) < 5e-2
    with pytest.raises(ValueError, match="floating-point dtype"):
        granite_jax.load(tmp_path / "gj", dtype="int32")


@pytest.mark.parametrize("name", ["tiny", "one_layer", "plus", "zero_layers"])
def test_output_hidden_states_match_hf(converted, name):
    """`output_hidden_states=True`: HF's hidden_states (the input projection, then every block), per row alone
    when batched with lengths, and through `encode` too, tiled or not."""
    import torch

    ref, model = converted(name)
    cfg = CONFIGS[name]
    rng = np.random.default_rng(4)
    t = 3 * cfg.context_size + 1
    x = rng.standard_normal((2, t, cfg.input_dim)).astype(np.float32)
    lengths = np.array([t, t - cfg.context_size - 1])
    with torch.no_grad():
        want = [ref(torch.from_numpy(x[i : i + 1, :n]), output_hidden_states=True) for i, n in enumerate(lengths)]
    for tiled in (None, 1):
        m = granite_jax.Runner(model.model, chunk_blocks=tiled)
        last, states = m.encode_features(x, lengths, output_hidden_states=True)
        assert states.shape == (cfg.num_layers + 1, 2, t, cfg.hidden_dim)
        for i, n in enumerate(lengths):
            hs = want[i].hidden_states  # HF: each block's input, then last_hidden_state; none without blocks
            assert len(hs) == (cfg.num_layers + 1 if cfg.num_layers else 0)
            for k, h in enumerate(hs):
                got = last[i, :n] if k == cfg.num_layers and cfg.is_plus else states[k, i, :n]
                assert rel_err(got, h[0].numpy()) < TOL, (tiled, i, k)
            assert rel_err(last[i, :n], want[i].last_hidden_state[0].numpy()) < TOL
            assert not np.asarray(states[:, i, n:]).any()
