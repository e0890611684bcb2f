"""Helpers shared by the tests, the demo, the notebooks and the benchmarks (the torch reference in `hf`).

Nothing here is imported by the runtime library; `granite_jax.testing.hf` needs torch and transformers.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from granite_jax.models.conformer_config import EncoderConfig

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
HAS_TORCHAUDIO = HAS_TORCH and importlib.util.find_spec("torchaudio") is not None

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


def jit_call(module, method: str = "__call__"):
    """`module.method(*args)` under one `nnx.jit`: called eagerly, a module compiles one small program per
    operation and input shape, which is most of a small test's time. Arguments are arrays or pytrees."""
    from flax import nnx

    call = nnx.jit(lambda m, *args: getattr(m, method)(*args))
    return lambda *args: call(module, *args)


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def convert_cli(src: str | os.PathLike, dst: str | os.PathLike, *args: str) -> None:
    """Run the real `granite-jax-convert` entry point; raise if it exits non-zero."""
    from granite_jax.convert.cli import main

    rc = main([os.fspath(src), os.fspath(dst), "--quiet", *args])
    if rc != 0:
        raise AssertionError(f"granite-jax-convert exited {rc}")


def torch_encode(encoder, features: np.ndarray) -> np.ndarray:
    """HF reference `last_hidden_state` for a (B, T, F) numpy batch."""
    import torch

    with torch.no_grad():
        return encoder(torch.from_numpy(np.asarray(features, np.float32))).last_hidden_state.numpy()


__all__ = ["HAS_TORCH", "HAS_TORCHAUDIO", "TINY", "convert_cli", "jit_call", "rel_err", "torch_encode"]
