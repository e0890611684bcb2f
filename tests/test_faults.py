"""Hostile input and faults: sources never destroyed, nothing left behind by a killed run, outputs that
follow the umask, every bad file or argument named, nothing non-finite returned."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import granite_jax
from granite_jax.checkpoint import atomic
from granite_jax.checkpoint import store as checkpoint
from granite_jax.testing import TINY, convert_cli

pytestmark = pytest.mark.torch
CFG = dataclasses.replace(TINY, input_dim=160, num_layers=2)


def _cli(main, *args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([os.fspath(a) for a in args])
    return rc, err.getvalue()


def _convert(*args):
    from granite_jax.convert.cli import main

    return _cli(main, *args, "--quiet")


def _digest(folder) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from granite_jax.testing.hf import make_hf_checkpoint

    d = tmp_path_factory.mktemp("faults")
    make_hf_checkpoint(CFG, d / "hf", full=True, seed=5)
    return d / "hf"


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
    import shutil

    shutil.copytree(hf_dir, tmp_path / "hf")
    return tmp_path / "hf"


# -- the converter never destroys its source --------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "holds"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_overlapping_the_source_is_refused(hf_copy, tmp_path, where, overwrite):
    before = _digest(hf_copy)
    dst = {"same": hf_copy, "inside": hf_copy / "converted", "holds": tmp_path}[where]
    rc, err = _convert(hf_copy, dst, *(["--overwrite"] if overwrite else []))
    assert rc == 1 and "source checkpoint" in err, err
    assert _digest(hf_copy) == before
    assert not (hf_copy / "converted").exists()


def test_destination_through_a_symlink_to_the_source_is_refused(hf_copy, tmp_path):
    os.symlink(hf_copy, tmp_path / "alias")
    rc, err = _convert(hf_copy, tmp_path / "alias", "--overwrite")
    assert rc == 1 and "source checkpoint" in err


def test_overwrite_replaces_only_a_granite_jax_checkpoint(hf_dir, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"not a checkpoint")
    rc, err = _convert(hf_dir, other, "--overwrite")
    assert rc == 1 and "not a granite_jax checkpoint" in err
    assert (other / "cat.jpg").read_bytes() == b"not a checkpoint"
    (tmp_path / "file").write_text("x")
    rc, err = _convert(hf_dir, tmp_path / "file", "--overwrite")
    assert rc == 1 and "not a folder" in err
    (tmp_path / "empty").mkdir()
    assert _convert(hf_dir, tmp_path / "empty", "--overwrite")[0] == 0  # an empty folder may be filled
    assert _convert(hf_dir, tmp_path / "empty", "--overwrite")[0] == 0  # and a checkpoint replaced
    assert checkpoint.is_checkpoint(tmp_path / "empty")


def test_destination_problems_are_found_before_reading(hf_dir, tmp_path, monkeypatch):
    from granite_jax.convert import convert

    def no_read(*a, **k):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(convert, "convert_hf", no_read)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        rc, err = _convert(hf_dir, locked / "gj")
        assert rc == 1 and "not a writable folder" in err
    finally:
        os.chmod(locked, 0o700)


# -- permissions follow the umask -------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(hf_dir, tmp_path, mask):
    from granite_jax.cli.encode import main as encode_main

    old = os.umask(mask)
    try:
        assert _convert(hf_dir, tmp_path / "gj")[0] == 0
        wav = tmp_path / "a.wav"
        _write_wav(wav, np.zeros(4000, np.float32))
        assert _cli(encode_main, tmp_path / "gj", wav, "--out", tmp_path / "out.npz", "--quiet")[0] == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "gj").st_mode & 0o777 == 0o777 & ~mask
    for f in os.listdir(tmp_path / "gj"):
        assert os.stat(tmp_path / "gj" / f).st_mode & 0o777 == 0o666 & ~mask, f
    assert os.stat(tmp_path / "out.npz").st_mode & 0o777 == 0o666 & ~mask


def _write_wav(path, samples, sr=16000):
    import soundfile

    soundfile.write(path, samples, sr, subtype="PCM_16")


# -- killed runs leave nothing behind ---------------------------------------------------------------------
_SLOW_WRITE = """
import os, sys, time
import safetensors.numpy, numpy
marker = os.environ["MARKER"]
def stall(*a, **k):
    open(marker, "w").close()
    time.sleep(60)
safetensors.numpy.save_file = stall
numpy.savez = stall
"""


def _killed_run(argv: list[str], sig: int, tmp_path) -> subprocess.CompletedProcess:
    """Run a granite-jax command in a subprocess whose writer stalls, and send it `sig` while it writes."""
    marker = tmp_path / "writing"
    code = _SLOW_WRITE + textwrap.dedent(f"""
        sys.argv = {argv!r}
        from {argv[0]} import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = dict(os.environ, MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and (".tmp-" in n or ".old-" in n))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_converter_leaves_nothing_and_the_next_run_succeeds(hf_dir, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    done = _killed_run(["granite_jax.convert.cli", str(hf_dir), str(out / "gj"), "--quiet"], sig, tmp_path)
    assert done.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), done.stderr
    assert not (out / "gj").exists()
    if sig == signal.SIGTERM:
        assert _leftovers(out) == [] and "terminated" in done.stderr
    else:
        assert len(_leftovers(out)) == 1  # SIGKILL cannot be caught: the next run removes it
    assert _convert(hf_dir, out / "gj")[0] == 0
    assert _leftovers(out) == [] and checkpoint.is_checkpoint(out / "gj")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_encode_leaves_nothing_and_the_next_run_succeeds(hf_dir, tmp_path, sig):
    from granite_jax.cli.encode import main as encode_main

    convert_cli(hf_dir, tmp_path / "gj")
    _write_wav(tmp_path / "a.wav", np.zeros(4000, np.float32))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["granite_jax.cli.encode", str(tmp_path / "gj"), str(tmp_path / "a.wav"), "--out", str(out / "e.npz")]
    done = _killed_run(argv + ["--quiet"], sig, tmp_path)
    assert done.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), done.stderr
    assert not (out / "e.npz").exists()
    assert len(_leftovers(out)) == (0 if sig == signal.SIGTERM else 1)
    assert _cli(encode_main, *argv[1:], "--quiet")[0] == 0
    assert _leftovers(out) == [] and (out / "e.npz").exists()


def test_a_live_runs_temporaries_are_kept(tmp_path):
    """Only temporaries of processes that are gone are removed (a concurrent run's are its own)."""
    dst = tmp_path / "gj"
    live = tmp_path / f".gj.tmp-{atomic._HOST}-{os.getppid()}-abc"
    dead = tmp_path / f".gj.tmp-{atomic._HOST}-{2**22 + 12345}-abc"
    other_host = tmp_path / ".gj.tmp-elsewhere-1-abc"
    for p in (live, dead, other_host):
        p.mkdir()
    assert atomic.remove_stale(dst) == [str(dead)]
    assert live.exists() and other_host.exists() and not dead.exists()


# -- every bad file named ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "{nope", "[1, 2]", '"a string"', "null"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "preprocessor_config.json"])
def test_bad_json_files_are_named(hf_copy, tmp_path, content, name):
    (hf_copy / name).write_text(content)
    rc, err = _convert(hf_copy, tmp_path / "gj")
    assert rc == 1 and name in err and "Traceback" not in err, err
    assert not (tmp_path / "gj").exists()


def test_bad_granite_jax_json_is_named(hf_dir, tmp_path):
    convert_cli(hf_dir, tmp_path / "gj")
    for content in ("", "[]", "{nope"):
        (tmp_path / "gj" / "granite_jax.json").write_text(content)
        with pytest.raises(checkpoint.CheckpointError, match="granite_jax.json"):
            granite_jax.load(tmp_path / "gj")


def test_index_naming_a_shard_without_the_tensor(tmp_path):
    from granite_jax.testing.hf import make_hf_checkpoint

    make_hf_checkpoint(CFG, tmp_path / "hf", full=True, max_shard_size="30KB", seed=1)
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = "encoder.input_linear.weight"
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    index_path.write_text(json.dumps(index))
    rc, err = _convert(tmp_path / "hf", tmp_path / "gj")
    assert rc == 1 and key in err and "does not hold" in err


def test_torch_bin_files(tmp_path):
    """pytorch_model.bin: the legacy (non-zip) format loads; a zero-byte or garbage file is named."""
    import torch

    from granite_jax.testing.hf import make_hf_checkpoint

    ref = make_hf_checkpoint(CFG, tmp_path / "hf", seed=2)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert _convert(tmp_path / "hf", tmp_path / "legacy")[0] == 0
    for content in (b"", b"garbage, not a pickle"):
        (tmp_path / "hf" / "pytorch_model.bin").write_bytes(content)
        rc, err = _convert(tmp_path / "hf", tmp_path / "gj")
        assert rc == 1 and "pytorch_model.bin" in err and "mmap" not in err, err


def test_non_finite_weights_are_refused_by_the_converter(hf_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = hf_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["encoder.layers.1.attn.to_q.weight"][0, 3] = np.nan
    save_file(tensors, path, metadata={"format": "pt"})
    rc, err = _convert(hf_copy, tmp_path / "gj")
    assert rc == 1 and "layers.1.attn.to_q.weight" in err and "NaN or infinite" in err


# -- nothing non-finite is returned ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(hf_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    convert_cli(hf_dir, d / "gj", "--encoder-only")  # the encoder and its CTC head
    return granite_jax.load(d / "gj")


def test_non_finite_features_are_named_and_padding_is_ignored(model):
    x = np.random.default_rng(0).standard_normal((3, 20, CFG.input_dim)).astype(np.float32)
    lengths = np.array([20, 12, 5])
    bad = x.copy()
    bad[1, 4, 7] = np.nan
    with pytest.raises(ValueError, match=r"features row\(s\) \[1\] hold NaN"):
        model.encode_features(bad, lengths)
    garbage = x.copy()
    garbage[1, 12:] = np.nan  # past row 1's length: padding, never read
    garbage[2, 5:] = np.inf
    got = np.asarray(model.encode_features(garbage, lengths))
    np.testing.assert_array_equal(got, np.asarray(model.encode_features(x, lengths)))
    with pytest.raises(ValueError, match=r"encoder output of row\(s\) \[0\] is not finite although"):
        model.encode_features(np.where(np.arange(3)[:, None, None] == 0, x * 1e20, x), lengths)


def test_huge_audio_is_refused(model):
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    with pytest.raises(ValueError, match="waveform 1 has peak amplitude .*overflows float32"):
        model.encode([wave, wave * 1e18])
    assert np.isfinite(np.asarray(model.encode(wave * 1e10).hidden_states)).all()


def test_any_iterable_of_waveforms_and_named_refusals(model, tmp_path):
    """A generator (or map, deque) of arrays is a batch like a list; a dict or a string is named as such."""
    import collections

    import soundfile

    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 5000)]
    want = model.encode(waves).hidden_states
    for batch in ((w for w in waves), map(np.asarray, waves), collections.deque(waves), iter(waves)):
        np.testing.assert_array_equal(np.asarray(model.encode(batch).hidden_states), np.asarray(want))
    with pytest.raises(TypeError, match="waveforms must be an array or a sequence of them, not a dict"):
        model.encode({"a": waves[0]})
    with pytest.raises(TypeError, match="not a string: read files with granite_jax.load_audio"):
        model.encode("talk.flac")
    with pytest.raises(ValueError, match="got an empty list of waveforms"):
        model.encode(w for w in [])
    soundfile.write(tmp_path / "a.wav", waves[0], 16000)
    paths = (str(tmp_path / "a.wav") for _ in range(2))
    assert model.transcribe(paths) == model.transcribe([waves[0], waves[0]])


def test_non_finite_weights_are_never_returned_as_nan(hf_dir, tmp_path):
    convert_cli(hf_dir, tmp_path / "gj")
    m = granite_jax.load(tmp_path / "gj")
    kernel = m.model.layers.ff1.up_proj.kernel
    kernel.set_value(kernel.get_value().at[1, 0, 0].set(np.nan))  # layer 1's weights
    with pytest.raises(ValueError, match="weights hold NaN"):
        m.encode(np.zeros(4000, np.float32) + 0.01)
    h = np.zeros((1, 5, CFG.output_width), np.float32)
    h[0, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"hidden_states row\(s\) \[0\] hold NaN"):
        m.ctc_logits(h)
    with pytest.raises(ValueError, match=r"hidden_states row\(s\) \[0\] hold NaN"):
        m.audio_embeddings(h)


def test_ctc_greedy_decode_lengths():
    from granite_jax.text.ctc import ctc_greedy_decode

    ids = np.array([[65, 65, 0, 66, 66], [67, 0, 67, 0, 0]])
    assert ctc_greedy_decode(ids, [5, 3]) == ["AB", "CC"]
    with pytest.raises(ValueError, match="2 integers"):
        ctc_greedy_decode(ids, [5])
    with pytest.raises(ValueError, match=r"lie in \[0, 5\]"):
        ctc_greedy_decode(ids, [5, -5])
    with pytest.raises(ValueError, match=r"lie in \[0, 5\]"):
        ctc_greedy_decode(ids, [6, 1])


# -- the encode CLI names files and checks its output first ------------------------------------------------
def test_encode_cli_names_the_bad_file(hf_dir, tmp_path, monkeypatch):
    from granite_jax.cli.encode import main as encode_main

    convert_cli(hf_dir, tmp_path / "gj")
    clips = tmp_path / "clips"
    clips.mkdir()
    _write_wav(clips / "good.wav", np.zeros(8000, np.float32))
    _write_wav(clips / "tiny.wav", np.zeros(100, np.float32))
    rc, err = _cli(encode_main, tmp_path / "gj", clips, "--out", tmp_path / "o.npz", "--quiet")
    assert rc == 1 and "tiny.wav has 100 samples" in err, err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("problem", ["missing_parent", "directory", "read_only", "exists"])
def test_encode_cli_checks_its_output_before_encoding(hf_dir, tmp_path, monkeypatch, problem):
    from granite_jax.cli import encode as encode_cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(granite_jax, "load", no_load)
    _write_wav(tmp_path / "a.wav", np.zeros(4000, np.float32))
    out = {
        "missing_parent": tmp_path / "nowhere" / "o.npz",
        "directory": tmp_path / "d.npz",
        "read_only": tmp_path / "ro" / "o.npz",
        "exists": tmp_path / "o.npz",
    }[problem]
    if problem == "directory":
        out.mkdir()
    if problem == "read_only":
        out.parent.mkdir()
        os.chmod(out.parent, 0o500)
        if os.access(out.parent, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
    if problem == "exists":
        out.write_bytes(b"keep me")
    rc, err = _cli(encode_cli.main, tmp_path, tmp_path / "a.wav", "--out", out, "--quiet")
    assert rc == 1 and str(out.parent if problem in ("missing_parent", "read_only") else out) in err, err
    if problem == "exists":
        assert out.read_bytes() == b"keep me"
