"""EncoderConfig: built from every HF config shape, validated with errors that say what is wrong."""

from __future__ import annotations

import dataclasses
import json

import pytest

from granite_jax.hf_config import ConfigError
from granite_jax.models.conformer_config import PRODUCTION, EncoderConfig
from granite_jax.testing import TINY


@pytest.mark.torch
@pytest.mark.parametrize("plus", [False, True])
def test_from_transformers_configs(tmp_path, plus):
    """Bare encoder configs and full GraniteSpeech(Plus)Config's encoder_config, as transformers writes them."""
    from granite_jax.testing.hf import hf_encoder_config, hf_full_model

    cfg = dataclasses.replace(TINY, cat_hidden_layers=(2, 0)) if plus else TINY
    hf = hf_encoder_config(cfg)
    assert EncoderConfig.from_hf_config(hf) == cfg
    hf.save_pretrained(tmp_path / "enc")
    assert EncoderConfig.from_hf_config(tmp_path / "enc") == cfg
    assert EncoderConfig.from_hf_config(tmp_path / "enc" / "config.json") == cfg
    full = hf_full_model(cfg, seed=0, perturb=False)
    full.config.save_pretrained(tmp_path / "full")
    assert EncoderConfig.from_hf_config(tmp_path / "full") == cfg
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"].startswith("granite_speech")


def test_round_trip_dict():
    for cfg in (TINY, PRODUCTION, dataclasses.replace(TINY, cat_hidden_layers=(1,))):
        assert EncoderConfig.from_hf_config(cfg.to_hf_dict()) == cfg


def test_dim_head_default_and_derived():
    cfg = EncoderConfig(hidden_dim=64, num_heads=4)
    assert cfg.dim_head == 16 and cfg.inner_dim == 64
    assert dataclasses.replace(TINY, num_heads=3, dim_head=8).inner_dim == 24
    assert EncoderConfig(num_layers=1).self_conditioning_layer == 0
    assert EncoderConfig(num_layers=16).self_conditioning_layer == 8
    plus = EncoderConfig(num_layers=4, hidden_dim=8, num_heads=2, cat_hidden_layers=(3, 1, 1))
    assert plus.exported_layers == (1, 3) and plus.output_width == 24 and plus.is_plus
    assert not PRODUCTION.is_plus and PRODUCTION.output_width == 1024


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(context_size=600), r"context_size \(600\) exceeds max_pos_emb \(512\)"),
        (dict(context_size=0), "context_size must be a positive integer"),
        (dict(hidden_dim=-1), "hidden_dim must be a positive integer"),
        (dict(num_layers=-2), "num_layers must be a non-negative integer"),
        (dict(hidden_dim=4, num_heads=8), "set dim_head explicitly"),
        (dict(dim_head=0), "dim_head must be a positive integer"),
        (dict(num_layers=4, cat_hidden_layers=(5,)), r"cat_hidden_layers entry 5 is out of range \[0, 4\]"),
        (dict(cat_hidden_layers=(-1,)), "out of range"),
        (dict(dropout=1.5), "dropout"),
        (dict(conv_kernel_size=2.5), "conv_kernel_size must be a positive integer"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EncoderConfig(**kwargs)


def test_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        EncoderConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        EncoderConfig.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="not a Granite Speech encoder"):
        EncoderConfig.from_hf_config({"model_type": "whisper"})
    with pytest.raises(ConfigError, match="has no encoder_config"):
        EncoderConfig.from_hf_config({"model_type": "granite_speech"})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.num_layers = 4  # type: ignore[misc]
