"""granite_jax's on-disk format: a directory with the encoder config, the NNX variables as safetensors
and provenance. No pickle. Written atomically: a failed write leaves nothing behind.

    DST/config.json          HF encoder config (HF field names; readable by transformers too)
    DST/params.safetensors   NNX variables keyed by module path, e.g. layers.0.attn.to_q.kernel
    DST/granite_jax.json     format version, source, dtype, converter version, time
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from granite_jax.config import EncoderConfig
from granite_jax.safetensors_file import SafetensorsFile

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
META_FILE = "granite_jax.json"


class CheckpointError(ValueError):
    """A granite_jax checkpoint directory that cannot be written or read."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by `save` (granite-jax-convert)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def save(
    dst: str | os.PathLike,
    config: EncoderConfig,
    params: dict[str, np.ndarray],
    provenance: dict[str, Any],
    *,
    overwrite: bool = False,
) -> None:
    """Write a checkpoint directory atomically (temp dir + rename); refuse to replace one unless `overwrite`."""
    from safetensors.numpy import save_file

    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2, sort_keys=True)
        arrays = {k: np.require(v, requirements="C") for k, v in params.items()}  # keeps 0-d arrays 0-d
        save_file(arrays, os.path.join(tmp, PARAMS_FILE), metadata={"format": "granite_jax"})
        meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta.update(provenance)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LazyParams(Mapping):
    """{path: array} over a params.safetensors file, each tensor read only when asked for."""

    def __init__(self, file: str):
        self._file = SafetensorsFile(file)
        self._keys = tuple(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load(path: str | os.PathLike) -> tuple[EncoderConfig, Mapping[str, np.ndarray], dict[str, Any]]:
    """(config, lazy {path: array}, provenance) of a checkpoint directory."""
    path = os.fspath(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a granite_jax checkpoint (no {META_FILE})")
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}; this granite_jax reads {FORMAT_VERSION}"
        )
    config = EncoderConfig.from_hf_config(os.path.join(path, CONFIG_FILE))
    params = LazyParams(os.path.join(path, PARAMS_FILE))
    return config, params, meta
