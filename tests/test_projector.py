"""The audio projector (BLIP-2 Q-Former + linear) against transformers' GraniteSpeechEncoderProjector.

Reference models are whole GraniteSpeech(Plus)ForConditionalGeneration made with transformers, every
encoder and projector parameter perturbed (learned query, LayerNorm gains and biases included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from granite_jax.checkpoint import store as checkpoint
from granite_jax.convert import PROJECTOR_KEYS, ConversionError, Converted, convert_hf, flax_to_hf, hf_to_flax
from granite_jax.convert.cli import main as convert_main
from granite_jax.hf_config import ConfigError
from granite_jax.models.conformer import encoder_from_params
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.projector import (
    GraniteSpeechProjector,
    abstract_projector_params,
    activation,
    num_audio_embeddings,
    projector_from_params,
    projector_params_of,
)
from granite_jax.models.projector_config import PROJECTOR_ACTIVATIONS, ProjectorConfig
from granite_jax.testing import TINY, convert_cli, jit_call, rel_err
from granite_jax.testing.hf import (
    hf_audio_features,
    hf_full_model,
    hf_project,
    make_hf_checkpoint,
    make_hf_full_checkpoint,
)

TOL = 1e-4  # of max|reference|, fp32
CFG = dataclasses.replace(TINY, num_layers=2)
PLUS = dataclasses.replace(CFG, cat_hidden_layers=(0, 1))

# (name, encoder config, projector settings): layers 1/2/3, cross-attention every 1 or 2 layers,
# window/downsample 15/5, 4/2, 6/3, 4/4 (one query), several activations, the plus variant's width.
CASES = [
    ("default", CFG, {}),
    ("2L_freq1_w4d2_gelu_new", CFG, dict(num_hidden_layers=2, cross_attention_frequency=1, window_size=4,
                                         downsample_rate=2, hidden_act="gelu_new")),
    ("3L_freq2_w6d3_relu", CFG, dict(num_hidden_layers=3, cross_attention_frequency=2, window_size=6,
                                     downsample_rate=3, hidden_act="relu")),
    ("3L_freq1_text_input_silu", CFG, dict(num_hidden_layers=3, cross_attention_frequency=1, hidden_act="silu",
                                           use_qformer_text_input=True)),
    ("2L_w4d4_4heads_eps", CFG, dict(num_hidden_layers=2, window_size=4, downsample_rate=4, hidden_size=48,
                                     num_attention_heads=4, intermediate_size=40, llm_hidden_size=24,
                                     layer_norm_eps=1e-5, hidden_act="quick_gelu")),
    ("plus_2L_tanh_gelu", PLUS, dict(num_hidden_layers=2, hidden_act="gelu_pytorch_tanh")),
]  # fmt: skip


def _expected(pcfg: ProjectorConfig, dtype=np.float32) -> dict:
    return {k: (tuple(v.shape), np.dtype(dtype)) for k, v in abstract_projector_params(pcfg).items()}


def _projector_of(model) -> tuple[ProjectorConfig, GraniteSpeechProjector]:
    """Our projector from an in-memory HF full model, through the converter's key table."""
    pcfg = ProjectorConfig.from_hf_config(model.config)
    state = {k: v.detach().numpy() for k, v in model.model.projector.state_dict().items()}
    params = hf_to_flax(state, state.__getitem__, _expected(pcfg), table=PROJECTOR_KEYS)
    return pcfg, projector_from_params(pcfg, params)


def _edit_safetensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _run_cli(*args) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert_main([os.fspath(a) for a in args] + ["--quiet"])
    return rc, err.getvalue()


# -- configuration -----------------------------------------------------------------------------------------
def test_config_from_full_hf_config_and_back(tmp_path):
    full = {
        "model_type": "granite_speech",
        "window_size": 6,
        "downsample_rate": 3,
        "text_config": {"model_type": "granite", "hidden_size": 48},
        "encoder_config": CFG.to_hf_dict(),
        "projector_config": {
            "model_type": "blip_2_qformer",
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 80,
            "hidden_act": "gelu_new",
            "layer_norm_eps": 1e-6,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": 32,
            "use_qformer_text_input": True,
            "vocab_size": 30522,  # fields the projector does not use are ignored
        },
    }
    pcfg = ProjectorConfig.from_hf_config(full)
    assert pcfg == ProjectorConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        hidden_act="gelu_new",
        layer_norm_eps=1e-6,
        cross_attention_frequency=1,
        encoder_hidden_size=32,
        use_qformer_text_input=True,
        window_size=6,
        downsample_rate=3,
        llm_hidden_size=48,
    )
    assert pcfg.num_queries == 2 and pcfg.head_dim == 16
    assert [pcfg.has_cross_attention(i) for i in range(3)] == [True, True, True]
    assert ProjectorConfig.from_hf_config(pcfg.to_hf_dict()) == pcfg
    (tmp_path / "config.json").write_text(json.dumps(full))
    assert ProjectorConfig.from_hf_config(tmp_path) == pcfg  # a directory
    assert ProjectorConfig.from_hf_config(tmp_path / "config.json") == pcfg
    # a bare encoder config has no projector
    assert ProjectorConfig.from_hf_config(CFG.to_hf_dict()) is None
    assert ProjectorConfig.from_hf_config(PLUS.to_hf_dict()) is None
    assert ProjectorConfig.from_hf_config({"input_dim": 4}) is None


@pytest.mark.torch
def test_config_matches_transformers_defaults():
    """From a PretrainedConfig; a full config with no sub-configs gets transformers' defaults."""
    import transformers as tf

    hf = tf.GraniteSpeechConfig()
    pcfg = ProjectorConfig.from_hf_config(hf)
    assert pcfg == ProjectorConfig.from_hf_config({"model_type": "granite_speech"})
    q = hf.projector_config
    assert (pcfg.hidden_size, pcfg.num_hidden_layers, pcfg.num_attention_heads, pcfg.intermediate_size) == (
        q.hidden_size,
        q.num_hidden_layers,
        q.num_attention_heads,
        q.intermediate_size,
    )
    assert (pcfg.hidden_act, pcfg.layer_norm_eps, pcfg.cross_attention_frequency) == (
        q.hidden_act,
        q.layer_norm_eps,
        q.cross_attention_frequency,
    )
    assert (pcfg.encoder_hidden_size, pcfg.use_qformer_text_input) == (q.encoder_hidden_size, q.use_qformer_text_input)
    assert (pcfg.window_size, pcfg.downsample_rate) == (hf.window_size, hf.downsample_rate)
    assert pcfg.llm_hidden_size == hf.text_config.hidden_size
    assert pcfg == ProjectorConfig()  # our defaults are transformers'


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_act="mish"), "hidden_act 'mish' is not supported"),
        (dict(hidden_size=30, num_attention_heads=4), "not a multiple of num_attention_heads"),
        (dict(window_size=4, downsample_rate=5), "num_queries = window_size // downsample_rate would be 0"),
        (dict(window_size=7, downsample_rate=2), "not a multiple of downsample_rate"),
        (dict(num_hidden_layers=0), "at least 1"),
        (dict(cross_attention_frequency=0), "cross_attention_frequency must be a positive integer"),
        (dict(window_size=0), "window_size must be a positive integer"),
        (dict(llm_hidden_size=-1), "llm_hidden_size must be a positive integer"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps"),
        (dict(use_qformer_text_input=1), "use_qformer_text_input must be a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ProjectorConfig(**kwargs)


def test_config_rejects_other_models():
    with pytest.raises(ConfigError, match="not a Granite Speech model"):
        ProjectorConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ConfigError, match="only 'blip_2_qformer'"):
        ProjectorConfig.from_hf_config({"model_type": "granite_speech", "projector_config": {"model_type": "mlp"}})
    with pytest.raises(ConfigError, match="projector_config must be a dict"):
        ProjectorConfig.from_hf_config({"projector_config": [1]})


@pytest.mark.torch
def test_window_not_a_multiple_of_downsample_rate_breaks_the_reference():
    """Why 7/2 is refused: HF accepts it, works for one window, then reshapes to the wrong number of rows."""
    import torch

    model = hf_full_model(CFG, projector=dict(window_size=7, downsample_rate=2))
    h = torch.randn(1, 7, CFG.hidden_dim)
    with torch.no_grad():
        assert model.model.projector(h).shape == (1, 3, 32)  # one window: 3 queries
        with pytest.raises(RuntimeError):  # two windows: view(1, 14 // 2 = 7, -1) of 2 x 3 rows
            model.model.projector(torch.randn(1, 14, CFG.hidden_dim))


# -- parity with the torch projector ------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("name, cfg, settings", CASES, ids=[c[0] for c in CASES])
def test_projector_parity(name, cfg, settings):
    """NNX projector == HF projector at T in {1, window - 1, window, window + 1, 3 x window}, batch 2."""
    model = hf_full_model(cfg, seed=len(name), projector=settings)
    pcfg, proj = _projector_of(model)
    assert pcfg.encoder_hidden_size == cfg.output_width
    w = pcfg.window_size
    rng = np.random.default_rng(len(name))
    for t in sorted({1, max(w - 1, 1), w, w + 1, 3 * w}):
        h = rng.standard_normal((2, t, cfg.output_width)).astype(np.float32)
        want = hf_project(model, h)
        got = np.asarray(jit_call(proj)(h))
        assert got.shape == want.shape == (2, num_audio_embeddings(t, pcfg), pcfg.llm_hidden_size)
        err = rel_err(got, want)
        assert err < TOL, (name, t, err)


@pytest.mark.torch
@pytest.mark.slow
def test_projector_parity_at_production_widths():
    """Released-model widths (Q-Former 1024 wide, 2 layers, 16 heads, 4096 feed-forward, cross-attention in
    every layer, 2048-wide LLM, window 15 / 5) on 437 frames (about 9 s of audio) and a whole number of windows."""
    cfg = dataclasses.replace(TINY, num_layers=1, hidden_dim=1024, num_heads=8, dim_head=128)
    settings = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                    cross_attention_frequency=1, llm_hidden_size=2048)  # fmt: skip
    model = hf_full_model(cfg, seed=1, projector=settings)
    pcfg, proj = _projector_of(model)
    for t in (437, 450):
        h = np.random.default_rng(t).standard_normal((2, t, cfg.hidden_dim)).astype(np.float32)
        want = hf_project(model, h)
        assert want.shape == (2, 90, 2048)
        err = rel_err(jit_call(proj)(h), want)
        assert err < TOL, (t, err)


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(PROJECTOR_ACTIVATIONS))
def test_activations_match_transformers(name):
    import torch
    from transformers.activations import ACT2FN

    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    want = ACT2FN[name](torch.from_numpy(x)).numpy()
    got = np.asarray(activation(name)(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        activation("mish")


@pytest.mark.torch
def test_zeros_past_the_end_reproduce_each_utterance_alone():
    """Rows whose frames past their length are zero (as the Runner returns them) give, in their first
    num_audio_embeddings(length) outputs, what the row alone gives: the last window is zero-padded either way."""
    model = hf_full_model(CFG, seed=2, projector=dict(num_hidden_layers=2))
    pcfg, proj = _projector_of(model)
    lengths = [31, 1, 15, 16]
    rng = np.random.default_rng(3)
    h = rng.standard_normal((len(lengths), 31, CFG.hidden_dim)).astype(np.float32)
    h[np.arange(31)[None, :] >= np.array(lengths)[:, None]] = 0
    batched = np.asarray(jit_call(proj)(h))
    counts = num_audio_embeddings(lengths, pcfg)
    assert counts.tolist() == [9, 3, 3, 6]
    for i, n in enumerate(lengths):
        alone = hf_project(model, h[i : i + 1, :n])
        assert alone.shape[1] == counts[i]
        assert rel_err(batched[i : i + 1, : counts[i]], alone) < TOL


@pytest.mark.torch
def test_bfloat16_compute_runs_close_to_fp32():
    model = hf_full_model(CFG, seed=4, projector=dict(num_hidden_layers=2))
    pcfg, proj = _projector_of(model)
    params = projector_params_of(proj)
    proj16 = projector_from_params(pcfg, params, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert proj16.query[...].dtype == jnp.bfloat16
    h = np.random.default_rng(5).standard_normal((2, 20, CFG.hidden_dim)).astype(np.float32)
    got = jit_call(proj16)(h)
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got, np.float32), hf_project(model, h)) < 5e-2


@pytest.mark.parametrize("chunk", [1, 3, 4, 9])  # 10 windows: chunks that do not divide them too
def test_chunked_projector_equals_unchunked(monkeypatch, chunk):
    """Many windows (long audio) go through the Q-Former a chunk of windows at a time: same result."""
    from granite_jax.models import projector

    pcfg = ProjectorConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
                           encoder_hidden_size=12, llm_hidden_size=10)  # fmt: skip
    proj = GraniteSpeechProjector(pcfg)
    h = np.random.default_rng(1).standard_normal((2, 5 * pcfg.window_size - 3, 12)).astype(np.float32)
    want = np.asarray(proj(h))
    monkeypatch.setattr(projector, "CHUNK_WINDOWS", chunk)
    got = np.asarray(proj(h))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_module_errors():
    pcfg = ProjectorConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                           encoder_hidden_size=12, llm_hidden_size=10)  # fmt: skip
    proj = GraniteSpeechProjector(pcfg)
    assert proj(np.zeros((1, 16, 12), np.float32)).shape == (1, 6, 10)
    with pytest.raises(ValueError, match="encoder_hidden_size=12"):
        proj(np.zeros((1, 16, 13), np.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        proj(np.zeros((1, 0, 12), np.float32))
    params = projector_params_of(proj)
    params.pop("linear.bias")
    with pytest.raises(ValueError, match="missing \\['linear.bias'\\]"):
        projector_from_params(pcfg, params)
    params["linear.bias"] = np.zeros(11, np.float32)
    with pytest.raises(ValueError, match="linear.bias: shape"):
        projector_from_params(pcfg, params)
    # NNX paths are the HF keys minus `projector.`, leaves renamed only
    assert "qformer.encoder.layer.0.crossattention.output.LayerNorm.scale" in params
    assert not any(".intermediate." in k or ".output." in k.replace("attention.output.", "") for k in params)


# -- audio embedding counts -------------------------------------------------------------------------------
@pytest.mark.torch
def test_num_audio_embeddings_matches_the_feature_extractor():
    """Re-derived from GraniteSpeechFeatureExtractor._get_num_audio_features, and checked against it (run on a
    stand-in `self`: instantiating the extractor needs torchaudio)."""
    from transformers.models.granite_speech.feature_extraction_granite_speech import GraniteSpeechFeatureExtractor

    raw = [0, 1, 159, 160, 319, 320, 4799, 4800, 4801, 16000, 16_000 * 7 + 123, 480_000]
    for window, rate in [(15, 5), (4, 2), (6, 3), (4, 4)]:
        pcfg = ProjectorConfig(window_size=window, downsample_rate=rate)
        stand_in = types.SimpleNamespace(
            melspec_kwargs={"hop_length": 160}, projector_window_size=window, projector_downsample_rate=rate
        )
        want = GraniteSpeechFeatureExtractor._get_num_audio_features(stand_in, raw)
        encoder_frames = [(r // 160 + 1) // 2 for r in raw]  # mel frames, two stacked per encoder frame
        assert num_audio_embeddings(encoder_frames, pcfg).tolist() == list(want)
        assert [num_audio_embeddings(n, pcfg) for n in encoder_frames] == list(want)
    with pytest.raises(ValueError, match="non-negative integers"):
        num_audio_embeddings([-1], ProjectorConfig())


# -- end to end: HF checkpoint -> converter -> projector ----------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize(
    "cfg, dtype, shard",
    [(CFG, "float32", None), (PLUS, "float32", None), (CFG, "bfloat16", "30KB"), (PLUS, "bfloat16", "30KB")],
    ids=["plain", "plus", "plain-bf16-sharded", "plus-bf16-sharded"],
)
def test_end_to_end_against_get_audio_features(tmp_path, cfg, dtype, shard):
    """convert a whole HF checkpoint -> load -> projector(encoder states) == HF get_audio_features().pooler_output."""
    settings = dict(num_hidden_layers=2, cross_attention_frequency=1, window_size=6, downsample_rate=2)
    ref = make_hf_full_checkpoint(cfg, tmp_path / "hf", seed=11, dtype=dtype, max_shard_size=shard, projector=settings)
    if shard:
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    loaded = checkpoint.load(tmp_path / "gj")
    assert isinstance(loaded, Converted) and loaded.config == cfg
    assert loaded.projector_config == ProjectorConfig.from_hf_config(tmp_path / "hf")
    assert loaded.projector_config.encoder_hidden_size == cfg.output_width
    proj = projector_from_params(loaded.projector_config, loaded.projector_params)
    encoder = encoder_from_params(loaded.config, loaded.params)
    x = np.random.default_rng(12).standard_normal((2, 13, cfg.input_dim)).astype(np.float32)
    want = hf_audio_features(ref, x)
    assert want.shape == (2, num_audio_embeddings(13, loaded.projector_config), 32)
    import torch

    with torch.no_grad():
        states = ref.model.encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    assert rel_err(jit_call(proj)(states), want) < TOL  # projector alone, on torch's encoder output
    assert rel_err(jit_call(proj)(jit_call(encoder)(jnp.asarray(x))), want) < TOL  # our encoder, then our projector


@pytest.mark.torch
def test_in_memory_layout_model_prefix(tmp_path):
    """transformers' in-memory keys (`model.encoder.*`, `model.projector.*`), here a pickled state dict."""
    import torch

    ref = make_hf_full_checkpoint(CFG, tmp_path / "st", seed=18)
    assert any(k.startswith("model.projector.") for k in ref.state_dict())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    conv = convert_hf(os.fspath(tmp_path / "bin"))
    assert conv.provenance["source_prefix"] == "model.encoder."
    assert conv.provenance["source_projector_prefix"] == "model.projector."
    proj = projector_from_params(conv.projector_config, conv.projector_params)
    h = np.random.default_rng(19).standard_normal((1, 16, CFG.hidden_dim)).astype(np.float32)
    assert rel_err(jit_call(proj)(h), hf_project(ref, h)) < TOL


@pytest.mark.torch
def test_bfloat16_conversion_casts_the_projector(tmp_path):
    ref = make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=13)
    convert_cli(tmp_path / "hf", tmp_path / "gj", "--dtype", "bfloat16")
    stored = load_file(tmp_path / "gj" / "params.safetensors")
    assert str(stored["projector.linear.kernel"].dtype) == "bfloat16"
    assert str(stored["projector.query"].dtype) == "bfloat16"
    loaded = checkpoint.load(tmp_path / "gj")
    proj = projector_from_params(loaded.projector_config, loaded.projector_params)  # cast back to fp32
    h = np.random.default_rng(14).standard_normal((1, 16, CFG.hidden_dim)).astype(np.float32)
    assert rel_err(jit_call(proj)(h), hf_project(ref, h)) < 3e-2


@pytest.mark.torch
def test_round_trip_back_to_hf(tmp_path):
    """NNX params -> HF keys reproduces the whole encoder + projector state dict exactly."""
    settings = dict(num_hidden_layers=3, cross_attention_frequency=2, use_qformer_text_input=True)
    make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=15, projector=settings)
    conv = convert_hf(os.fspath(tmp_path / "hf"))
    back = flax_to_hf(conv.params, prefix="encoder.") | flax_to_hf(
        conv.projector_params, prefix="projector.", table=PROJECTOR_KEYS
    )
    original = {k: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items() if not k.startswith("lang")}
    assert any(".intermediate.dense." in k for k in original)  # the text-input feed-forward has a home
    assert any(".crossattention." in k for k in original) and "projector.query" in original
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# -- converter errors name the key ---------------------------------------------------------------------------
@pytest.fixture
def full_dir(tmp_path):
    make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=16, projector=dict(num_hidden_layers=2))
    return tmp_path / "hf"


@pytest.mark.torch
def test_missing_projector_tensor_is_named(full_dir, tmp_path):
    key = "projector.qformer.encoder.layer.0.crossattention.attention.key.weight"
    _edit_safetensors(full_dir / "model.safetensors", lambda t: t.pop(key))
    rc, err = _run_cli(full_dir, tmp_path / "gj")
    assert rc == 1 and "qformer.encoder.layer.0.crossattention.attention.key.kernel" in err and "not filled" in err
    assert "projector config" in err
    assert not (tmp_path / "gj").exists()
    with pytest.raises(ConversionError, match="crossattention.attention.key.kernel"):
        convert_hf(os.fspath(full_dir))


@pytest.mark.torch
def test_unexpected_projector_tensors_are_named(full_dir, tmp_path):
    def add(t):
        t["projector.qformer.encoder.layer.0.bogus.weight"] = np.zeros((2, 2), np.float32)
        # layer 1 has no cross-attention with cross_attention_frequency 2
        t["projector.qformer.encoder.layer.1.crossattention.output.dense.bias"] = np.zeros(32, np.float32)

    _edit_safetensors(full_dir / "model.safetensors", add)
    rc, err = _run_cli(full_dir, tmp_path / "gj")
    assert rc == 1
    assert "qformer.encoder.layer.0.bogus.weight" in err and "projector tensors with no mapping" in err
    assert "qformer.encoder.layer.1.crossattention.output.dense.bias" in err and "no parameter for" in err
    assert not (tmp_path / "gj").exists()


@pytest.mark.torch
@pytest.mark.parametrize(
    "key, bad, want",
    [
        ("projector.linear.weight", (33, 32), "(32, 32)"),
        ("projector.query", (1, 4, 32), "(1, 3, 32)"),
        ("projector.qformer.encoder.layer.0.crossattention.attention.value.weight", (32, 31), "(32, 32)"),
    ],
)
def test_misshaped_projector_tensor_is_named(full_dir, tmp_path, key, bad, want):
    def change(t):
        t[key] = np.zeros(bad, np.float32)

    _edit_safetensors(full_dir / "model.safetensors", change)
    rc, err = _run_cli(full_dir, tmp_path / "gj")
    assert rc == 1 and "projector shape mismatch" in err
    assert key.removeprefix("projector.") in err and "(" + ", ".join(map(str, bad)) + ")" in err and want in err


@pytest.mark.torch
def test_projector_width_must_match_the_encoder(full_dir, tmp_path):
    cfg = json.loads((full_dir / "config.json").read_text())
    cfg["projector_config"]["encoder_hidden_size"] = 64
    (full_dir / "config.json").write_text(json.dumps(cfg))
    rc, err = _run_cli(full_dir, tmp_path / "gj")
    assert rc == 1 and "encoder_hidden_size (64)" in err and "output width (32" in err


# -- the checkpoint directory --------------------------------------------------------------------------------
@pytest.mark.torch
def test_checkpoint_keeps_the_projector(full_dir, tmp_path):
    convert_cli(full_dir, tmp_path / "gj", "--encoder-only")
    assert sorted(os.listdir(tmp_path / "gj")) == [
        "config.json",
        "granite_jax.json",
        "params.safetensors",
        "preprocessor_config.json",
        "projector_config.json",
    ]
    convert_cli(full_dir, tmp_path / "whole")  # by default the language model and its files come too
    assert {"language_config.json", "language_model.safetensors", "generation_config.json"} <= set(
        os.listdir(tmp_path / "whole")
    )
    conv = convert_hf(os.fspath(full_dir))
    stored = load_file(tmp_path / "gj" / "params.safetensors")
    assert sorted(stored) == sorted(list(conv.params) + ["projector." + k for k in conv.projector_params])
    loaded = checkpoint.load(tmp_path / "gj")
    assert loaded.projector_config == conv.projector_config
    assert json.loads((tmp_path / "gj" / "projector_config.json").read_text()) == conv.projector_config.to_hf_dict()
    assert sorted(loaded.params) == sorted(conv.params)  # the encoder's view holds no projector keys
    assert sorted(loaded.projector_params) == sorted(conv.projector_params)
    for k, v in conv.projector_params.items():
        np.testing.assert_array_equal(loaded.projector_params[k], v, err_msg=k)
    assert json.loads((tmp_path / "gj" / "granite_jax.json").read_text())["format_version"] == 1
    # save() from a Converted, as the api would
    checkpoint.save(tmp_path / "again", *loaded[:3], projector_config=loaded[3], projector_params=loaded[4])
    assert checkpoint.load(tmp_path / "again").projector_config == conv.projector_config
    with pytest.raises(checkpoint.CheckpointError, match="together"):
        checkpoint.save(tmp_path / "x", *loaded[:3], projector_config=loaded[3])


@pytest.mark.torch
def test_bare_encoder_checkpoint_has_no_projector(tmp_path):
    """A bare encoder (and any format-1 directory written before the projector) loads with projector None."""
    make_hf_checkpoint(CFG, tmp_path / "hf", seed=17)
    conv = convert_hf(os.fspath(tmp_path / "hf"))
    assert conv.projector_config is None and conv.projector_params is None
    assert "source_projector_prefix" not in conv.provenance
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    assert not (tmp_path / "gj" / "projector_config.json").exists()
    loaded = checkpoint.load(tmp_path / "gj")
    assert loaded.projector_config is None and loaded.projector_params is None
    assert sorted(loaded.params) == sorted(conv.params)


@pytest.mark.torch
def test_projector_params_without_their_config_are_refused(full_dir, tmp_path):
    convert_cli(full_dir, tmp_path / "gj")
    os.remove(tmp_path / "gj" / "projector_config.json")
    with pytest.raises(checkpoint.CheckpointError, match="no projector_config.json"):
        checkpoint.load(tmp_path / "gj")


def test_encoder_config_is_unchanged_by_projector_fields():
    """The full config's encoder part still reads as before (EncoderConfig ignores the projector)."""
    full = {"model_type": "granite_speech", "encoder_config": CFG.to_hf_dict(), **ProjectorConfig().to_hf_dict()}
    assert EncoderConfig.from_hf_config(full) == CFG
    assert ProjectorConfig.from_hf_config(full) == ProjectorConfig()
