"""granite-jax-convert: formats, errors that name the keys, atomic writes, round trip back to HF."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import granite_jax
from granite_jax.checkpoint import store as checkpoint
from granite_jax.convert import convert_hf, flax_to_hf, sources
from granite_jax.convert.cli import main as convert_main
from granite_jax.testing import TINY, convert_cli, rel_err, torch_encode
from granite_jax.testing.hf import make_hf_checkpoint

pytestmark = pytest.mark.torch
CFG = dataclasses.replace(TINY, num_layers=2)


def _run_cli(*args) -> tuple[int, str]:
    """The CLI's exit code and stderr, in process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert_main([os.fspath(a) for a in args] + ["--quiet"])
    return rc, err.getvalue()


@pytest.fixture
def hf_dir(tmp_path):
    ref = make_hf_checkpoint(CFG, tmp_path / "hf", seed=3)
    return tmp_path / "hf", ref


def _edit_safetensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_console_script(hf_dir, tmp_path):
    """The installed `granite-jax-convert` script works end to end and writes the documented files."""
    src, ref = hf_dir
    exe = os.path.join(os.path.dirname(sys.executable), "granite-jax-convert")
    out = subprocess.run([exe, src, tmp_path / "gj"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "gj")) == [
        "config.json",
        "granite_jax.json",
        "params.safetensors",
        "preprocessor_config.json",
    ]
    meta = json.loads((tmp_path / "gj" / "granite_jax.json").read_text())
    assert meta["dtype"] == "float32" and meta["converter_version"] and meta["source"] == os.path.abspath(src)
    x = np.random.default_rng(0).standard_normal((1, 10, CFG.input_dim)).astype(np.float32)
    assert rel_err(granite_jax.load(tmp_path / "gj").encode_features(x), torch_encode(ref, x)) < 1e-4


@pytest.mark.parametrize("plus", [False, True])
def test_sharded_full_model_in_bf16(tmp_path, plus):
    """A whole GraniteSpeech(Plus)ForConditionalGeneration, sharded, stored in bf16: language_model.* is never read."""
    cfg = dataclasses.replace(CFG, cat_hidden_layers=(0, 1)) if plus else CFG
    ref = make_hf_checkpoint(cfg, tmp_path / "hf", full=True, dtype="bfloat16", max_shard_size="30KB", seed=4)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert any(k.startswith("projector.") for k in index["weight_map"])
    assert any(k.startswith("language_model.") for k in index["weight_map"])
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    assert model.config == cfg
    x = np.random.default_rng(1).standard_normal((2, 13, cfg.input_dim)).astype(np.float32)
    assert rel_err(model.encode_features(x), torch_encode(ref, x)) < 1e-4
    assert json.loads((tmp_path / "gj" / "granite_jax.json").read_text())["source_dtype"] == "bfloat16"


def test_only_encoder_and_projector_shards_are_opened(tmp_path, monkeypatch):
    make_hf_checkpoint(CFG, tmp_path / "hf", full=True, max_shard_size="30KB", seed=4)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    enc = {v for k, v in index["weight_map"].items() if k.startswith(("encoder.", "projector."))}
    other = set(index["weight_map"].values()) - enc
    assert other, "the test needs shards without encoder or projector tensors"
    from granite_jax.checkpoint.safetensors_file import SafetensorsFile

    opened = []
    real = SafetensorsFile.__init__

    def spy(self, path):
        opened.append(os.path.basename(path))
        real(self, path)

    monkeypatch.setattr(SafetensorsFile, "__init__", spy)
    convert_hf(os.fspath(tmp_path / "hf"), language_model=False)
    assert set(opened) == enc
    opened.clear()
    conv = convert_hf(os.fspath(tmp_path / "hf"))  # the language model too (its shards opened lazily)
    dict(conv.language_params)
    assert set(opened) == set(index["weight_map"].values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_option(hf_dir, tmp_path, dtype):
    src, ref = hf_dir
    convert_cli(src, tmp_path / "gj", "--dtype", dtype)
    params = load_file(tmp_path / "gj" / "params.safetensors")
    assert str(params["input_linear.kernel"].dtype) == dtype
    assert params["layers.0.conv.batch_norm.num_batches_tracked"].dtype == np.int32
    x = np.random.default_rng(2).standard_normal((1, 9, CFG.input_dim)).astype(np.float32)
    assert rel_err(granite_jax.load(tmp_path / "gj").encode_features(x), torch_encode(ref, x)) < 3e-2


def test_round_trip_back_to_hf(hf_dir):
    """NNX params -> HF keys reproduces the original state dict exactly (values, shapes, dtypes)."""
    src, ref = hf_dir
    back = flax_to_hf(convert_hf(os.fspath(src)).params)
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    src, _ = hf_dir
    _edit_safetensors(src / "model.safetensors", lambda t: t.pop("layers.1.attn.to_q.weight"))
    rc, err = _run_cli(src, tmp_path / "gj")
    assert rc == 1 and "layers.1.attn.to_q.kernel" in err and "not filled" in err
    assert not (tmp_path / "gj").exists()


def test_extra_encoder_tensor_is_named(hf_dir, tmp_path):
    src, _ = hf_dir

    def add(t):
        t["layers.0.attn.bogus.weight"] = np.zeros((2, 2), np.float32)
        t["layers.2.post_norm.weight"] = np.ones(CFG.hidden_dim, np.float32)  # a layer the config lacks

    _edit_safetensors(src / "model.safetensors", add)
    rc, err = _run_cli(src, tmp_path / "gj")
    assert rc == 1
    assert "layers.0.attn.bogus.weight" in err and "no mapping" in err
    assert "layers.2.post_norm.weight" in err
    assert not (tmp_path / "gj").exists()


def test_wrong_shape_names_key_and_shapes(hf_dir, tmp_path):
    src, _ = hf_dir
    bad = (CFG.hidden_dim * 4 + 1, CFG.hidden_dim)

    def change(t):
        t["layers.0.ff1.up_proj.weight"] = np.zeros(bad, np.float32)

    _edit_safetensors(src / "model.safetensors", change)
    rc, err = _run_cli(src, tmp_path / "gj")
    assert rc == 1
    assert "layers.0.ff1.up_proj.weight" in err
    assert f"({bad[0]}, {bad[1]})" in err and f"({CFG.hidden_dim * 2}, {CFG.hidden_dim})" in err
    assert not (tmp_path / "gj").exists()


def test_existing_destination_needs_overwrite(hf_dir, tmp_path):
    src, _ = hf_dir
    convert_cli(src, tmp_path / "gj")
    before = (tmp_path / "gj" / "params.safetensors").read_bytes()
    rc, err = _run_cli(src, tmp_path / "gj")
    assert rc == 1 and "--overwrite" in err
    convert_cli(src, tmp_path / "gj", "--overwrite", "--dtype", "bfloat16")
    assert (tmp_path / "gj" / "params.safetensors").read_bytes() != before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left behind


def test_failed_write_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    src, _ = hf_dir
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        granite_jax.convert.convert_checkpoint(os.fspath(src), os.fspath(tmp_path / "gj"))
    assert os.listdir(tmp_path) == ["hf"]


def test_pytorch_model_bin(tmp_path):
    """A pickled checkpoint is read with torch.load(weights_only=True)."""
    import torch

    ref = make_hf_checkpoint(CFG, tmp_path / "st", seed=6)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    convert_cli(tmp_path / "bin", tmp_path / "gj")
    x = np.random.default_rng(3).standard_normal((1, 9, CFG.input_dim)).astype(np.float32)
    assert rel_err(granite_jax.load(tmp_path / "gj").encode_features(x), torch_encode(ref, x)) < 1e-4


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, err = _run_cli(tmp_path / "empty", tmp_path / "gj")
    assert rc == 1 and "config.json" in err
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"x": np.zeros(1, np.float32)}, tmp_path / "empty" / "model.safetensors")
    rc, err = _run_cli(tmp_path / "empty", tmp_path / "gj")
    assert rc == 1 and "no Granite Speech encoder tensors" in err
    rc, err = _run_cli(tmp_path / "nope" / "x" / "y", tmp_path / "gj")
    assert rc == 1 and "neither a local directory nor" in err


def test_hub_id_without_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf_home"))
    rc, err = _run_cli("ibm-granite/granite-speech-4.1-2b", tmp_path / "gj")
    assert rc == 1 and "could not fetch it from the Hugging Face Hub" in err
    assert not (tmp_path / "gj").exists()


def test_checkpoint_format_version_is_checked(hf_dir, tmp_path):
    src, _ = hf_dir
    convert_cli(src, tmp_path / "gj")
    meta = json.loads((tmp_path / "gj" / checkpoint.META_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / "gj" / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="format_version 99"):
        granite_jax.load(tmp_path / "gj")


def test_hub_download_fetches_only_what_the_encoder_needs(tmp_path, monkeypatch):
    """A hub id downloads config.json, the index and the encoder's and projector's shards, nothing else.

    The hub is served from a local sharded checkpoint (no network here); the reader code is the real one.
    """
    import shutil

    import huggingface_hub

    ref = make_hf_checkpoint(CFG, tmp_path / "remote", full=True, max_shard_size="30KB", seed=7)
    requested = []

    def fake_download(repo_id, filename, revision=None, **kw):
        assert repo_id == "org/model"
        requested.append(filename)
        if not (tmp_path / "remote" / filename).exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in org/model")
        dst = tmp_path / "snapshot" / filename
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "remote" / filename, dst)
        return os.fspath(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: None)
    config, params, prov, projector_config, projector_params, features, *_ = convert_hf(
        "org/model", language_model=False
    )
    index = json.loads((tmp_path / "remote" / "model.safetensors.index.json").read_text())
    shards = {v for k, v in index["weight_map"].items() if k.startswith(("encoder.", "projector."))}
    projector_only = shards - {v for k, v in index["weight_map"].items() if k.startswith("encoder.")}
    assert projector_only, "the test needs a shard holding only projector tensors"
    # preprocessor_config.json is asked for (the remote has none: the defaults)
    assert set(requested) == {"config.json", "preprocessor_config.json", "model.safetensors.index.json"} | shards
    assert features == granite_jax.FeatureConfig() and prov["feature_config_source"] == "defaults"
    assert len(shards) < len(set(index["weight_map"].values()))
    assert prov["source"] == "org/model" and config == CFG
    assert projector_config is not None and "linear.kernel" in projector_params
    x = np.random.default_rng(8).standard_normal((1, 9, CFG.input_dim)).astype(np.float32)
    model = granite_jax.Runner(granite_jax.models.conformer.encoder_from_params(config, params))
    assert rel_err(model.encode_features(x), torch_encode(ref, x)) < 1e-4
    # by default a whole checkpoint's language model comes too: its shards, and the files that go with it
    requested.clear()
    conv = convert_hf("org/model")
    lm = {v for k, v in index["weight_map"].items() if k.startswith("language_model.")}
    assert lm - shards, "the test needs a shard holding only language model tensors"
    assert set(requested) >= lm | shards and "generation_config.json" in requested and "tokenizer.json" in requested
    assert set(requested) - lm - shards <= {
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
    } | set(sources.LM_FILES)
    assert conv.language_config is not None and len(conv.language_params) > 0


def test_hub_unreachable_fails_at_once(tmp_path, monkeypatch):
    """Offline, a hub id gets its clear error after one connection attempt, not half a minute of retries."""
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("hf_hub_download was called although the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: "cannot reach huggingface.co: Name or service not known")
    rc, err = _run_cli("org/model", tmp_path / "gj")
    assert rc == 1 and "cannot reach huggingface.co" in err and "local directory" in err
    assert not (tmp_path / "gj").exists()


def test_progress_bar_for_sharded_checkpoints(tmp_path, capsys):
    make_hf_checkpoint(CFG, tmp_path / "hf", full=True, max_shard_size="30KB", seed=4)
    capsys.readouterr()
    assert convert_main([os.fspath(tmp_path / "hf"), os.fspath(tmp_path / "gj")]) == 0
    captured = capsys.readouterr()
    assert "reading" in captured.err and "shards" in captured.err and "tensor" in captured.err
    assert "wrote" in captured.out


def test_missing_encoder_shard_is_named(tmp_path):
    make_hf_checkpoint(CFG, tmp_path / "hf", full=True, max_shard_size="30KB", seed=4)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["encoder.layers.1.post_norm.weight"]
    os.remove(tmp_path / "hf" / shard)
    rc, err = _run_cli(tmp_path / "hf", tmp_path / "gj")
    assert rc == 1 and shard in err and "not there" in err


def test_float16_source(tmp_path):
    ref = make_hf_checkpoint(CFG, tmp_path / "hf", dtype="float16", seed=13)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    assert json.loads((tmp_path / "gj" / "granite_jax.json").read_text())["source_dtype"] == "float16"
    x = np.random.default_rng(9).standard_normal((1, 11, CFG.input_dim)).astype(np.float32)
    assert rel_err(granite_jax.load(tmp_path / "gj").encode_features(x), torch_encode(ref, x)) < 1e-4


def test_pytorch_model_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    make_hf_checkpoint(CFG, tmp_path / "st", seed=6)
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc, err = _run_cli(tmp_path / "bin", tmp_path / "gj")
    assert rc == 1 and "needs torch" in err and "pytorch_model.bin" in err
