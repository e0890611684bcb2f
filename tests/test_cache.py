"""The persistent compilation cache: a second process compiles nothing it has seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, time
import numpy as np
import granite_jax
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.conformer import GraniteSpeechEncoder
from flax import nnx
path = granite_jax.enable_compilation_cache(sys.argv[1])
cfg = EncoderConfig(input_dim=12, num_layers=2, hidden_dim=32, num_heads=2, output_dim=7, context_size=8)
enc = granite_jax.Runner(GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0)))
x = np.random.default_rng(0).standard_normal((2, 21, 12)).astype(np.float32)
out = np.asarray(enc.encode_features(x, lengths=[21, 5]))
print(json.dumps({"path": path, "sum": float(np.abs(out).sum())}))
"""


def _run(cache_dir) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cache_is_written_then_reused(tmp_path):
    cache = tmp_path / "xla"
    first = _run(cache)
    assert first["path"] == str(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    second = _run(cache)
    assert second["sum"] == first["sum"]
    assert sorted(p.name for p in cache.iterdir()) == entries  # all hits: nothing new compiled
