"""`granite-jax encode`: files and directories in, one safetensors / npz out, per-file exact, atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import granite_jax
from granite_jax.cli.main import main
from granite_jax.data import CLIPS, clip_path
from granite_jax.frontend.audio import load_audio
from granite_jax.testing import TINY, convert_cli, rel_err

pytestmark = pytest.mark.torch
CFG = TINY.__class__(**{**TINY.__dict__, "input_dim": 160, "num_layers": 2})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A converted full checkpoint (with projector) and a directory of audio in several formats and rates."""
    import soundfile

    from granite_jax.testing.hf import make_hf_full_checkpoint

    d = tmp_path_factory.mktemp("encode-cli")
    make_hf_full_checkpoint(CFG, d / "hf", seed=1)
    convert_cli(d / "hf", d / "gj")
    audio = d / "audio"
    (audio / "sub").mkdir(parents=True)
    fox = load_audio(clip_path("fox"))
    soundfile.write(audio / "fox.flac", fox, 16000)
    stereo = np.stack([fox[:20000], 0.5 * fox[:20000]], axis=1)
    soundfile.write(audio / "sub" / "stereo22k.wav", stereo[::1], 22050, subtype="PCM_16")
    rng = np.random.default_rng(0)
    soundfile.write(audio / "noise.ogg", (0.1 * rng.standard_normal(12000)).astype(np.float32), 16000)
    (audio / "notes.txt").write_text("not audio")
    return d / "gj", audio


def _run(*args) -> int:
    return main(["encode", *map(os.fspath, args), "--quiet"])


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_outputs_equal_encoding_each_file_alone(setup, tmp_path, ext):
    ckpt, audio = setup
    out = tmp_path / f"out.{ext}"
    levels = ["--level", "hidden", "--level", "embeddings", "--level", "text"]
    assert _run(ckpt, audio, "--out", out, "--batch-size", "2", *levels) == 0
    if ext == "npz":
        data = dict(np.load(out))
        texts = {k[: -len("/text")]: str(v) for k, v in data.items() if k.endswith("/text")}
        meta = json.loads(str(data["__meta__"]))
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        data = load_file(out)
        with safe_open(out, "np") as f:
            md = f.metadata()
        texts = {k[: -len("/text")]: v for k, v in md.items() if k.endswith("/text")}
        meta = md
    assert meta["levels"] == "hidden,embeddings,text"
    model = granite_jax.load(ckpt)
    names = ["fox.flac", "noise.ogg", os.path.join("sub", "stereo22k.wav")]
    assert sorted(texts) == sorted(names)
    for name in names:
        res = model.encode(load_audio(audio / name))
        utt = res.utterance(0)
        assert rel_err(data[f"{name}/hidden_states"], utt["hidden_states"]) < 1e-5, name
        assert rel_err(data[f"{name}/audio_embeddings"], utt["audio_embeddings"]) < 1e-5, name
        assert texts[name] == model.ctc_greedy(res.hidden_states, res.lengths)[0]


def test_console_script_reports_throughput(setup, tmp_path):
    ckpt, _ = setup
    exe = os.path.join(os.path.dirname(sys.executable), "granite-jax")
    out = tmp_path / "o.safetensors"
    proc = subprocess.run(
        [exe, "encode", ckpt, *(clip_path(c) for c in CLIPS), "--out", out], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "real-time factor" in proc.stderr and "encoding" in proc.stderr  # summary and progress bar
    from safetensors.numpy import load_file

    assert sorted(load_file(out)) == sorted(f"{c}.flac/audio_embeddings" for c in CLIPS)  # default level


def test_errors_leave_no_file(setup, tmp_path, capsys):
    ckpt, audio = setup
    out = tmp_path / "o.npz"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    assert _run(ckpt, audio, bad, "--out", out) == 1
    assert "broken.wav" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".o.npz")]
    out.write_bytes(b"old")
    assert _run(ckpt, audio, "--out", out) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert _run(ckpt, audio, "--out", tmp_path / "o.txt") == 1
    assert ".safetensors or .npz" in capsys.readouterr().err
    assert _run(ckpt, tmp_path / "missing.wav", "--out", tmp_path / "x.npz") == 1
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(ckpt, empty, "--out", tmp_path / "x.npz") == 1
    assert "no audio files" in capsys.readouterr().err


def test_bare_encoder_defaults_to_hidden_and_refuses_embeddings(tmp_path, capsys):
    from granite_jax.testing.hf import make_hf_checkpoint

    make_hf_checkpoint(CFG, tmp_path / "hf")
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    assert _run(tmp_path / "gj", clip_path("fox"), "--out", tmp_path / "h.npz") == 0
    assert list(np.load(tmp_path / "h.npz")) == ["fox.flac/hidden_states", "__meta__"]
    assert _run(tmp_path / "gj", clip_path("fox"), "--out", tmp_path / "e.npz", "--level", "embeddings") == 1
    assert "no projector" in capsys.readouterr().err
