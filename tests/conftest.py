"""Shared fixtures: HF reference checkpoints made on the spot, the real converter CLI, skip decorators."""

from __future__ import annotations

import importlib.util
import os

# On a GPU, pytest-xdist workers (and the subprocesses some tests start) share the device: do not let
# each one preallocate most of its memory. Must be set before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np
import pytest

# fp32 matmuls default to TF32 on GPUs; the parity tolerances assume full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the torch reference: pip install 'granite-jax[torch]'")
requires_gpu = pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda", "rocm"), reason="needs a GPU")

from granite_jax.config import EncoderConfig  # noqa: E402
from granite_jax.reference import make_hf_checkpoint  # noqa: E402, F401

# A small config exercising every code path; tests derive variants with dataclasses.replace.
TINY = EncoderConfig(
    input_dim=12,
    num_layers=3,
    hidden_dim=32,
    feedforward_mult=2,
    num_heads=2,
    dim_head=16,
    output_dim=7,
    context_size=8,
    max_pos_emb=10,
    conv_kernel_size=5,
    conv_expansion_factor=2,
)


def convert_cli(src, dst, *args: str) -> None:
    """Run the real `granite-jax-convert` entry point; fail the test on a non-zero exit."""
    from granite_jax.convert.cli import main

    rc = main([os.fspath(src), os.fspath(dst), "--quiet", *args])
    assert rc == 0, f"granite-jax-convert exited {rc}"


def torch_encode(encoder, features: np.ndarray) -> np.ndarray:
    """HF reference `last_hidden_state` for a (B, T, F) numpy batch."""
    import torch

    with torch.no_grad():
        return encoder(torch.from_numpy(np.asarray(features, np.float32))).last_hidden_state.numpy()


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
