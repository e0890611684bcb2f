"""The layerwise runner (one compiled block per call, each block's weights in arrays of their own) gives what
the one-jit scan over stacked weights gives, for both families, every output and path; `model` gives the
weights back unchanged."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from granite_jax.frontend.config import Speech5FeatureConfig
from granite_jax.models import speech5
from granite_jax.models.conformer import GraniteSpeechEncoder, encoder_from_params, params_of
from granite_jax.models.projector import GraniteSpeechProjector
from granite_jax.runtime.runner import Runner
from granite_jax.testing import TINY
from granite_jax.testing.hf5 import TINY5

CFG4 = {
    "odd_layers": dataclasses.replace(TINY, num_layers=3, conv_kernel_size=6),
    "plus_0_2": dataclasses.replace(TINY, num_layers=3, cat_hidden_layers=(0, 2)),
    "one_layer": dataclasses.replace(TINY, num_layers=1),
}
CFG5 = {
    "tiny": TINY5,
    "subsample_1_3": dataclasses.replace(TINY5, num_hidden_layers=5, subsample_layers=(1, 3)),
    "no_subsampling": dataclasses.replace(TINY5, subsample_layers=()),
}


def _perturbed(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()}


def _pair(cfg, chunk_blocks=2, **kw) -> tuple[Runner, Runner]:
    """(scan runner, layerwise runner) on the same perturbed weights, every parameter and buffer."""
    if isinstance(cfg, speech5.Speech5Config):
        params = _perturbed(speech5.params_of(speech5.GraniteSpeech5Encoder(cfg, rngs=nnx.Rngs(0))), 1)
        make = lambda: speech5.encoder_from_params(cfg, params)  # noqa: E731
    else:
        params = _perturbed(params_of(GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0))), 1)
        make = lambda: encoder_from_params(cfg, params)  # noqa: E731
    return (
        Runner(make(), chunk_blocks=chunk_blocks, **kw),
        Runner(make(), chunk_blocks=chunk_blocks, layerwise=True, **kw),
    )


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


CASES = [("odd_layers", None), ("odd_layers", 1), ("odd_layers", 3), ("plus_0_2", 2), ("one_layer", None)]
CASES += [(name, None) for name in CFG5]  # (Speech 5 is never tiled)


@pytest.mark.parametrize("name,chunk_blocks", CASES)
def test_layerwise_equals_scan(name, chunk_blocks):
    cfg = CFG4.get(name) or CFG5[name]
    scan, layerwise = _pair(cfg, chunk_blocks)
    assert layerwise.layerwise and not scan.layerwise
    c = cfg.context_size
    t = 4 * c + 1  # T % c = 1, several tiles
    x = np.random.default_rng(2).standard_normal((3, t, cfg.input_dim)).astype(np.float32)
    for lengths in (None, [t, 2 * c - 1, 2 * c]):  # remainders c - 1 and 0 in the padded rows
        _close(scan.encode_features(x, lengths), layerwise.encode_features(x, lengths))
        _close(
            scan.encode_features(x, lengths, output_hidden_states=True),
            layerwise.encode_features(x, lengths, output_hidden_states=True),
        )
    traces = layerwise.num_traces
    layerwise.encode_features(x, [5, 9, t])  # the same shape: nothing traced again
    assert layerwise.num_traces == traces
    assert repr(layerwise) == repr(scan)


def test_layerwise_encode_waveforms_with_projector():
    from granite_jax.models.projector_config import ProjectorConfig

    cfg = dataclasses.replace(TINY, input_dim=160, num_layers=3, conv_kernel_size=5, cat_hidden_layers=(1,))
    pcfg = ProjectorConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        encoder_hidden_size=cfg.output_width,
        llm_hidden_size=24,
    )
    projector = GraniteSpeechProjector(pcfg, rngs=nnx.Rngs(5))
    scan, layerwise = _pair(cfg, 2, projector=projector)
    rng = np.random.default_rng(3)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 4000, 9999)]
    for mode in ("per_utterance", "hf"):
        a = scan.encode(waves, batch_mode=mode, output_hidden_states=True)
        b = layerwise.encode(waves, batch_mode=mode, output_hidden_states=True)
        _close((a.features, a.hidden_states, a.audio_embeddings), (b.features, b.hidden_states, b.audio_embeddings))
        _close(a.layer_hidden_states, b.layer_hidden_states)
        np.testing.assert_array_equal(a.lengths, b.lengths)


@pytest.mark.parametrize("name", ["odd_layers", "subsample_1_3"])
def test_model_gives_the_weights_back(name):
    """Reading `model` stacks the blocks back, unchanged; the runner then runs the module (the scan path)."""
    cfg = CFG4.get(name) or CFG5[name]
    scan, layerwise = _pair(cfg)
    x = np.random.default_rng(4).standard_normal((2, 3 * cfg.context_size, cfg.input_dim)).astype(np.float32)
    before = np.asarray(layerwise.encode_features(x))
    of = speech5.params_of if isinstance(cfg, speech5.Speech5Config) else params_of
    want, got = of(scan.model), of(layerwise.model)
    assert not layerwise.layerwise
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    np.testing.assert_allclose(np.asarray(layerwise.encode_features(x)), before, rtol=1e-5, atol=1e-6)


def test_weights_are_held_once():
    """While layerwise, the module's stacked arrays are empty placeholders: the weights live once."""
    scan, layerwise = _pair(CFG4["odd_layers"])
    total = sum(int(np.prod(a.shape)) for a in scan.parameters())
    assert sum(int(np.prod(a.shape)) for a in layerwise.parameters()) == total
    stacked = nnx.to_flat_state(nnx.state(layerwise._module.layers))
    assert all(v.get_value().size == 0 for _, v in stacked)


@pytest.mark.parametrize("name", ["plus_0_2", "subsample_1_3"])
def test_load_builds_the_blocks_unstacked(tmp_path, name):
    """`load` reads each block's weights straight into arrays of their own (never a stacked copy): the
    runner is layerwise, holds every weight once, and equals the scan runner on the same checkpoint."""
    import granite_jax
    from granite_jax.checkpoint import store as checkpoint

    cfg = CFG4.get(name) or CFG5[name]
    scan, _ = _pair(cfg)
    of = speech5.params_of if isinstance(cfg, speech5.Speech5Config) else params_of
    features = dict(feature_config=Speech5FeatureConfig(num_mel_bins=cfg.num_mel_bins)) if name[0] == "s" else {}
    checkpoint.save(tmp_path / "ck", cfg, of(scan.model), {"source": "test"}, **features)
    loaded = granite_jax.load(tmp_path / "ck", chunk_blocks=2)
    assert loaded.layerwise
    assert all(v.get_value().size == 0 for _, v in nnx.to_flat_state(nnx.state(loaded._module.layers)))
    assert sum(int(np.prod(a.shape)) for a in loaded.parameters()) == sum(
        int(np.prod(a.shape)) for a in scan.parameters()
    )
    x = np.random.default_rng(6).standard_normal((2, 3 * cfg.context_size + 1, cfg.input_dim)).astype(np.float32)
    _close(
        scan.encode_features(x, [3 * cfg.context_size + 1, 7]), loaded.encode_features(x, [3 * cfg.context_size + 1, 7])
    )
