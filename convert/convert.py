"""HF checkpoint -> granite_jax variables (in memory) and -> a granite_jax checkpoint directory."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from granite_jax.convert.key_map import ConversionError, hf_to_flax
from granite_jax.convert.sources import open_hf_checkpoint

from granite_jax import checkpoint
from granite_jax.config import EncoderConfig

DTYPES = ("float32", "bfloat16", "float16")


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ConversionError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def convert_hf(
    src: str, *, dtype: str = "float32", progress: bool = False, revision: str | None = None
) -> tuple[EncoderConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Read the encoder of an HF checkpoint (directory or hub id) as (config, {nnx path: array}, provenance)."""
    from granite_jax.convert import CONVERTER_VERSION

    from granite_jax.modeling import abstract_params

    target = _np_dtype(dtype)
    with open_hf_checkpoint(src, revision=revision) as ckpt:
        config = EncoderConfig.from_hf_config(ckpt.config)
        expected = {
            k: (tuple(v.shape), target if np.issubdtype(v.dtype, np.floating) else np.dtype(v.dtype))
            for k, v in abstract_params(config).items()
        }
        bar = None
        if progress and len(ckpt.encoder_files) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ckpt.encoder_keys), unit="tensor", desc=f"reading {len(ckpt.encoder_files)} shards")
        try:
            params = hf_to_flax(ckpt.encoder_keys, ckpt.read, expected, on_tensor=bar and (lambda _: bar.update()))
        finally:
            if bar is not None:
                bar.close()
        source_dtype = str(ckpt.read("input_linear.bias").dtype)
    provenance = {
        "source": os.path.abspath(src) if os.path.exists(src) else src,
        "source_prefix": ckpt.prefix,
        "source_dtype": source_dtype,
        "dtype": dtype,
        "converter_version": CONVERTER_VERSION,
    }
    return config, params, provenance


def convert_checkpoint(
    src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Convert SRC (HF) into DST (granite_jax), atomically. Returns the provenance written."""
    if os.path.exists(dst) and not overwrite:
        raise checkpoint.CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    config, params, provenance = convert_hf(src, dtype=dtype, progress=progress)
    checkpoint.save(dst, config, params, provenance, overwrite=overwrite)
    return provenance
