"""The `granite-jax` command: demo (the README's set-up command) and the convert alias."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from granite_jax.cli.main import main
from granite_jax.testing import TINY
from granite_jax.testing.hf import make_hf_checkpoint

pytestmark = pytest.mark.torch


def test_demo_runs_and_reports_parity():
    """From a bundled clip to projector embeddings and generated text, compared with HF (exit status 0 means
    within 1e-3). In a process of its own with XLA's default CPU settings, the ones users get: the rest of
    the suite compiles with cheaper ones (conftest.py)."""
    from conftest import TEST_XLA_FLAGS

    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    exe = os.path.join(os.path.dirname(sys.executable), "granite-jax")
    proc = subprocess.run(
        [exe, "demo", "--layers", "1", "--seconds", "1", "--runs", "1"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "speed-up" in out and "projector embeddings:" in out and "encoder hidden states:" in out
    assert "1 x 1.00 s of speech (fox)" in out
    assert "generated token ids equal HF generate's: True" in out


def test_demo_speech5_runs_and_reports_parity(capsys):
    """The TurboCTC demo: features, logits and transcripts against HF's GraniteSpeech5ForCTC."""
    assert main(["demo", "--model", "speech5", "--layers", "1", "--seconds", "1", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "transcripts identical to HF's: True" in out and "CTC logits:" in out and "speed-up" in out


def test_convert_alias(tmp_path):
    make_hf_checkpoint(TINY, tmp_path / "hf")
    exe = os.path.join(os.path.dirname(sys.executable), "granite-jax")
    out = subprocess.run([exe, "convert", tmp_path / "hf", tmp_path / "gj", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gj" / "params.safetensors").exists()


def test_demo_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--layers", "0"])
    assert "must be positive" in capsys.readouterr().err


def test_runtime_needs_no_torch(tmp_path):
    """Converting, loading and encoding work with torch and transformers unimportable."""
    make_hf_checkpoint(TINY, tmp_path / "hf")
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
import granite_jax
from granite_jax.convert.cli import main
assert main([{str(tmp_path / "hf")!r}, {str(tmp_path / "gj")!r}, "--quiet"]) == 0
m = granite_jax.load({str(tmp_path / "gj")!r})
h = m.encode_features(np.zeros((1, 9, {TINY.input_dim}), np.float32))
assert h.shape == (1, 9, {TINY.hidden_dim}), h.shape
assert "torch" not in {{k for k, v in sys.modules.items() if v is not None}}
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_demo_without_torch_explains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["demo", "--layers", "1", "--seconds", "1"]) == 1
    assert "granite-jax[torch]" in capsys.readouterr().err
