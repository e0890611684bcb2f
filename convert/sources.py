"""Lazy readers for HF checkpoints: local directories (safetensors, sharded or not; pytorch_model.bin
through torch when installed) and hub ids (only the needed files are downloaded).

Only the encoder's tensors (and the projector's, when the config has one) are ever read, and only the
shards that hold them are opened; `language_model.*` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from granite_jax.config import has_projector
from granite_jax.convert.key_map import ConversionError
from granite_jax.safetensors_file import SafetensorsFile

# Encoder prefixes, most specific first: published full checkpoints use `encoder.`; transformers'
# in-memory layout is `model.encoder.`; a bare GraniteSpeechCTCEncoder has none.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")
FEATURE_CONFIG_FILE = "preprocessor_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def projector_prefix_for(encoder_prefix: str) -> str:
    """`encoder.` -> `projector.`, `model.encoder.` -> `model.projector.` (the projector sits beside the encoder)."""
    return encoder_prefix[: -len("encoder.")] + "projector." if encoder_prefix.endswith("encoder.") else "projector."


@dataclass
class HFCheckpoint:
    """An opened HF checkpoint: its config dict and lazy access to its encoder (and projector) tensors.

    `projector_prefix` is None when the config has no projector (a bare encoder).
    """

    source: str
    config: dict[str, Any]
    prefix: str
    weight_map: dict[str, str]  # full key -> file holding it
    projector_prefix: str | None = None
    feature_config: dict[str, Any] | None = None  # preprocessor_config.json, when the checkpoint has one
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _torch_state: dict[str, Any] = field(default_factory=dict, repr=False)

    def _keys_under(self, prefix: str | None) -> list[str]:
        if prefix is None:
            return []
        n = len(prefix)
        return sorted(k[n:] for k in self.weight_map if k.startswith(prefix))

    @property
    def encoder_keys(self) -> list[str]:
        """Encoder tensor names relative to the encoder (the prefix stripped)."""
        return self._keys_under(self.prefix)

    @property
    def projector_keys(self) -> list[str]:
        """Projector tensor names relative to the projector; empty without one."""
        return self._keys_under(self.projector_prefix)

    @property
    def encoder_files(self) -> list[str]:
        return sorted({self.weight_map[self.prefix + k] for k in self.encoder_keys})

    @property
    def needed_files(self) -> list[str]:
        """The weight files holding encoder or projector tensors: the only ones ever opened."""
        projector = {self.weight_map[self.projector_prefix + k] for k in self.projector_keys}
        return sorted(set(self.encoder_files) | projector)

    def read(self, key: str) -> np.ndarray:
        """One encoder tensor (relative name) as a numpy array in its stored dtype."""
        return self._read_full(self.prefix + key)

    def read_projector(self, key: str) -> np.ndarray:
        """One projector tensor (relative name) as a numpy array in its stored dtype."""
        if self.projector_prefix is None:
            raise KeyError(f"{self.source} has no projector")
        return self._read_full(self.projector_prefix + key)

    def _read_full(self, full: str) -> np.ndarray:
        path = self.weight_map[full]
        if path.endswith(".safetensors"):
            if path not in self._handles:
                self._handles[path] = SafetensorsFile(path)
            return self._handles[path].get_tensor(full)
        if path not in self._torch_state:
            self._torch_state.clear()  # keep one .bin shard alive at a time
            self._torch_state[path] = _torch_load(path)
        return _torch_to_numpy(self._torch_state[path][full])

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_load(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a pickled torch checkpoint; reading it needs torch (pip install torch), "
            "or convert the checkpoint to safetensors first"
        ) from None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _safetensors_keys(path: str) -> list[str]:
    try:
        return SafetensorsFile(path).keys()
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _weight_map(directory: str) -> dict[str, str]:
    """{tensor name: absolute file} from whichever weight files the directory has."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(directory, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)
            if "weight_map" not in index:
                raise ConversionError(f"{index_path} has no weight_map")
            return {k: os.path.join(directory, v) for k, v in index["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return {k: single for k in _safetensors_keys(single)}
    single_bin = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(single_bin):
        return {k: single_bin for k in _torch_load(single_bin)}
    raise ConversionError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _find_prefix(weight_map: dict[str, str], source: str) -> str:
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in weight_map):
            return prefix
    if "input_linear.weight" in weight_map:
        return ""
    raise ConversionError(
        f"{source} holds no Granite Speech encoder tensors (looked for keys under "
        f"{', '.join(repr(p) for p in ENCODER_PREFIXES)} or a bare encoder's input_linear.weight)"
    )


def open_hf_checkpoint(src: str, *, revision: str | None = None) -> HFCheckpoint:
    """Open a local HF checkpoint directory or a hub id (downloading only config and encoder shards)."""
    if os.path.isdir(src):
        directory = src
    elif os.path.exists(src):
        raise ConversionError(f"{src} is a file; pass the checkpoint directory that holds config.json")
    elif _HUB_ID.match(src):
        directory = _download_from_hub(src, revision=revision)
    else:
        raise ConversionError(f"{src} is neither a local directory nor a Hugging Face hub id (org/name)")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{directory} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    weight_map = _weight_map(directory)
    prefix = _find_prefix(weight_map, src)
    features = None
    features_path = os.path.join(directory, FEATURE_CONFIG_FILE)
    if os.path.exists(features_path):
        with open(features_path) as f:
            features = json.load(f)
    ckpt = HFCheckpoint(
        source=src,
        config=config,
        prefix=prefix,
        weight_map=weight_map,
        projector_prefix=projector_prefix_for(prefix) if has_projector(config) else None,
        feature_config=features,
    )
    # Only the shards holding encoder (and projector) tensors must be present (a hub download fetches just those).
    missing = [os.path.basename(f) for f in ckpt.needed_files if not os.path.exists(f)]
    if missing:
        raise ConversionError(
            f"{directory}: the index names encoder or projector shards that are not there: {', '.join(missing)}"
        )
    return ckpt


def _download_from_hub(repo_id: str, *, revision: str | None) -> str:
    """Fetch config.json and only the weight files holding encoder (and projector) tensors; return the
    snapshot dir."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise ConversionError("fetching from the hub needs huggingface_hub (pip install huggingface_hub)") from None

    def get(name: str) -> str:
        return hf_hub_download(repo_id, name, revision=revision)

    try:
        config_path = get("config.json")
        with contextlib.suppress(EntryNotFoundError):  # optional: the defaults without it
            get(FEATURE_CONFIG_FILE)
        try:
            index_path = get("model.safetensors.index.json")
        except EntryNotFoundError:
            get("model.safetensors")
        else:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            prefix = _find_prefix(weight_map, repo_id)
            with open(config_path) as f:
                wanted = (prefix, projector_prefix_for(prefix)) if has_projector(json.load(f)) else (prefix,)
            for shard in sorted({v for k, v in weight_map.items() if k.startswith(wanted)}):
                get(shard)
    except ConversionError:
        raise
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ConversionError(
            f"{repo_id!r} is not a local directory, and could not fetch it from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Without network access, download the checkpoint elsewhere and "
            "pass its local directory."
        ) from None
    return os.path.dirname(config_path)
