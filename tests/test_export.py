"""Back to Hugging Face: transformers loads what `export_hf` / `granite-jax export` writes, and it computes what
granite_jax computes; a round trip without training is bit-exact."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import granite_jax
from granite_jax.checkpoint.export import export_hf
from granite_jax.checkpoint.safetensors_file import SafetensorsFile
from granite_jax.testing import TINY, convert_cli, rel_err, torch_encode
from granite_jax.testing.hf import make_hf_checkpoint, make_hf_full_checkpoint

pytestmark = pytest.mark.torch
CFG = dataclasses.replace(TINY, input_dim=160, num_layers=3)
PROJECTOR = dict(num_hidden_layers=1, window_size=6, downsample_rate=3)


def _tensors(folder) -> dict[str, np.ndarray]:
    index = os.path.join(folder, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        f = SafetensorsFile(os.path.join(folder, name))
        out.update({k: f.get_tensor(k) for k in f})
    return out


@pytest.mark.parametrize("plus", [False, True])
def test_bare_encoder_loads_in_transformers(tmp_path, plus):
    cfg = dataclasses.replace(CFG, cat_hidden_layers=(0, 2)) if plus else CFG
    make_hf_checkpoint(cfg, tmp_path / "hf", seed=3)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    export_hf(model, tmp_path / "out")
    import transformers

    cls = transformers.GraniteSpeechPlusCTCEncoder if plus else transformers.GraniteSpeechCTCEncoder
    back = cls.from_pretrained(tmp_path / "out").eval()
    x = np.random.default_rng(0).standard_normal((2, 19, cfg.input_dim)).astype(np.float32)
    assert rel_err(torch_encode(back, x), np.asarray(model.encode_features(x))) < 1e-5
    want = _tensors(tmp_path / "hf")
    got = _tensors(tmp_path / "out")
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_model_round_trip_is_bit_exact(tmp_path, dtype):
    """HF (sharded, fp32 or bf16 as shipped) -> granite_jax (fp32) -> export with --base: every tensor as it was."""
    from granite_jax.cli.main import main

    make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=4, dtype=dtype, max_shard_size="40KB", projector=PROJECTOR)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"keep": "me"}')  # every other file is copied through
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    assert main(["export", str(tmp_path / "gj"), str(tmp_path / "out"), "--base", str(tmp_path / "hf")]) == 0
    want, got = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert set(got) == set(want) and len(want) > 10
    bad = [k for k in want if got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()]
    assert not bad, bad[:5]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "hf"))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"keep": "me"}'


def test_fine_tuned_model_in_the_full_checkpoint(tmp_path):
    """Changed weights land in the whole model: transformers' get_audio_features equals granite_jax's encode."""
    import transformers

    from granite_jax.models.conformer import params_of

    make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=5, projector=PROJECTOR)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    kernel = model.model.layers.attn.to_q.kernel
    kernel.set_value(kernel.get_value() * 1.5)  # as if trained
    export_hf(model, tmp_path / "out", base=tmp_path / "hf")
    back = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    wave = (0.1 * np.random.default_rng(1).standard_normal(9000)).astype(np.float32)
    res = model.encode(wave)
    with torch.no_grad():
        out = back.get_audio_features(torch.from_numpy(np.array(res.features)))
    assert rel_err(res.hidden_states, out.last_hidden_state.numpy()) < 1e-5
    assert rel_err(res.audio_embeddings, out.pooler_output.numpy()) < 1e-5
    lm_in, lm_out = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert all(np.array_equal(lm_in[k], lm_out[k]) for k in lm_in if k.startswith("language_model."))
    assert not np.array_equal(lm_in["encoder.layers.0.attn.to_q.weight"], lm_out["encoder.layers.0.attn.to_q.weight"])
    assert params_of(model.model)["layers.0.attn.to_q.kernel"].shape == (CFG.hidden_dim, CFG.inner_dim)


def test_lora_is_merged_on_export_and_the_model_is_left_alone(tmp_path):
    import transformers

    from granite_jax.train import lora

    make_hf_checkpoint(CFG, tmp_path / "hf", seed=6)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj").model
    lora.add_lora(model, rank=2)
    b = model.layers.attn.to_out.lora_b
    b.set_value(np.random.default_rng(0).standard_normal(b.get_value().shape).astype(np.float32) * 0.1)
    x = np.random.default_rng(1).standard_normal((1, 17, CFG.input_dim)).astype(np.float32)
    want = np.asarray(model(x))
    export_hf(model, tmp_path / "out")
    assert lora.has_lora(model)
    back = transformers.GraniteSpeechCTCEncoder.from_pretrained(tmp_path / "out").eval()
    assert rel_err(torch_encode(back, x), want) < 1e-5


def test_export_errors(tmp_path):
    make_hf_checkpoint(CFG, tmp_path / "hf", seed=7)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    other = dataclasses.replace(CFG, num_layers=2)
    make_hf_full_checkpoint(other, tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="encoder config differs"):
        export_hf(model, tmp_path / "out", base=tmp_path / "other")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        export_hf(model, tmp_path / "taken", overwrite=True)
    with pytest.raises(FileExistsError):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "out").exists()
