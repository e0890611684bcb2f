"""Lazy readers for HF checkpoints: local directories (safetensors, sharded or not; pytorch_model.bin
through torch when installed) and hub ids (only the needed files are downloaded).

Only the tensors a conversion asks for are read (the encoder's, the projector's, the language model's), and
only the shards that hold them are opened; an encoder-only conversion never touches `language_model.*`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from granite_jax.checkpoint.safetensors_file import SafetensorsFile
from granite_jax.checkpoint.store import CARRIED_FILES
from granite_jax.convert.key_map import ConversionError
from granite_jax.hf_config import ConfigError, has_projector, is_speech5, read_hf_config

# Encoder prefixes, most specific first: published full checkpoints use `encoder.`; transformers'
# in-memory layout is `model.encoder.`; a bare GraniteSpeechCTCEncoder has none.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")
FEATURE_CONFIG_FILE = "preprocessor_config.json"
SPEECH5_HEAD = "ctc_head."  # GraniteSpeech5ForCTC's head, beside `encoder.` (absent when tied to encoder.out)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Files a whole 4.x conversion carries along: prompts and decoding, the 3.x LoRA adapter, 4.1's BPE CTC head.
LM_FILES = CARRIED_FILES
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
    directory: str = ""
    extra_keys: list[str] = field(default_factory=list)  # full keys read beside the encoder (ctc_head.*)
    files: dict[str, str] = field(default_factory=dict)  # files copied into the conversion (the tokenizer)
    lm_map: dict[str, str] = field(default_factory=dict)  # language model key (GraniteForCausalLM's) -> full key
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _torch_state: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "config.json")

    @property
    def feature_config_path(self) -> str:
        return os.path.join(self.directory, FEATURE_CONFIG_FILE)

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
        """The weight files holding encoder, projector or extra tensors: the only ones ever opened."""
        projector = {self.weight_map[self.projector_prefix + k] for k in self.projector_keys}
        extra = {self.weight_map[k] for k in self.extra_keys}
        return sorted(set(self.encoder_files) | projector | extra)

    @property
    def lm_keys(self) -> list[str]:
        """The language model's tensor names as `GraniteForCausalLM` names them (`model.*`, `lm_head.weight`)."""
        return sorted(self.lm_map)

    def read_lm(self, key: str) -> np.ndarray:
        return self._read_full(self.lm_map[key])

    def lm_shape(self, key: str) -> tuple[int, ...] | None:
        """A language model tensor's shape from its file's header (None for .bin shards: read to know)."""
        path = self.weight_map[self.lm_map[key]]
        if not path.endswith(".safetensors"):
            return None
        if path not in self._handles:
            try:
                self._handles[path] = SafetensorsFile(path)
            except ValueError as e:
                raise ConversionError(str(e)) from None
        return self._handles[path].shape(self.lm_map[key])

    def lm_dtype(self, key: str) -> str | None:
        """A language model tensor's stored dtype: its safetensors code (F32, BF16, ...), or numpy's name."""
        path = self.weight_map[self.lm_map[key]]
        if path.endswith(".safetensors"):
            self.lm_shape(key)  # opens the file
            return self._handles[path].dtype(self.lm_map[key])
        return str(self.read_lm(key).dtype)

    @property
    def lm_files(self) -> list[str]:
        return sorted({self.weight_map[k] for k in self.lm_map.values()})

    def read_full(self, key: str) -> np.ndarray:
        """A tensor by its full name (one of `extra_keys`)."""
        return self._read_full(key)

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
                try:
                    self._handles[path] = SafetensorsFile(path)
                except ValueError as e:
                    raise ConversionError(str(e)) from None
            handle = self._handles[path]
            if full not in handle:
                raise ConversionError(f"the index names {os.path.basename(path)} for {full}, which it does not hold")
            return handle.get_tensor(full)
        if path not in self._torch_state:
            self._torch_state.clear()  # keep one .bin shard alive at a time
            self._torch_state[path] = _torch_load(path)
        state = self._torch_state[path]
        if full not in state:
            raise ConversionError(f"the index names {os.path.basename(path)} for {full}, which it does not hold")
        return _torch_to_numpy(state[full])

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_load(path: str) -> dict[str, Any]:
    """A pytorch_model.bin's state dict, never executing pickled code (weights_only)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a pickled torch checkpoint; reading it needs torch (pip install torch), "
            "or convert the checkpoint to safetensors first"
        ) from None
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path} is empty (0 bytes)")
    try:
        zipped = zipfile.is_zipfile(path)  # torch.save's format since 1.6; the legacy one cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ...
        raise ConversionError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of tensor names to tensors)")
    return state


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
            return {k: os.path.join(directory, v) for k, v in _read_index(index_path).items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return {k: single for k in _safetensors_keys(single)}
    single_bin = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(single_bin):
        return {k: single_bin for k in _torch_load(single_bin)}
    raise ConversionError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_json(path: str) -> dict:
    try:
        return read_hf_config(path, os.path.basename(path))
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def _read_index(path: str) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: {tensor name: shard file name}."""
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ConversionError(f"{path} has no weight_map of tensor names to shard files")
    bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v or v in ("", ".", "..")})
    if bad:
        raise ConversionError(f"{path} names shards outside its folder: {', '.join(bad)}")
    return weight_map


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


def open_hf_checkpoint(src: str, *, revision: str | None = None, language_model: bool = False) -> HFCheckpoint:
    """Open a local HF checkpoint directory or a hub id (downloading only config and the shards it reads).

    `language_model`: also the language model of a whole 4.x checkpoint (`lm_map`) and the files that go with
    it (tokenizer, chat template, generation config, LoRA adapter, `out_llm.safetensors`)."""
    if os.path.isdir(src):
        directory = src
    elif os.path.exists(src):
        raise ConversionError(f"{src} is a file; pass the checkpoint directory that holds config.json")
    elif _HUB_ID.match(src):
        directory = _download_from_hub(src, revision=revision, language_model=language_model)
    else:
        raise ConversionError(f"{src} is neither a local directory nor a Hugging Face hub id (org/name)")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{directory} has no config.json")
    config = _read_json(config_path)
    weight_map = _weight_map(directory)
    prefix = _find_prefix(weight_map, src)
    features = None
    features_path = os.path.join(directory, FEATURE_CONFIG_FILE)
    if os.path.exists(features_path):
        features = _read_json(features_path)
    speech5 = is_speech5(config)
    extra = sorted(k for k in weight_map if k.startswith(SPEECH5_HEAD)) if speech5 else []
    files = {}
    if speech5:
        files = {n: os.path.join(directory, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))}
    lm_map: dict[str, str] = {}
    if language_model and has_projector(config) and not speech5:
        lm_map = _lm_map(weight_map, src)
        files = {n: os.path.join(directory, n) for n in LM_FILES if os.path.isfile(os.path.join(directory, n))}
    ckpt = HFCheckpoint(
        source=src,
        config=config,
        prefix=prefix,
        weight_map=weight_map,
        projector_prefix=projector_prefix_for(prefix) if has_projector(config) else None,
        feature_config=features,
        directory=directory,
        extra_keys=extra,
        files=files,
        lm_map=lm_map,
    )
    # Only the shards holding encoder (and projector) tensors must be present (a hub download fetches just those).
    missing = [os.path.basename(f) for f in ckpt.needed_files + ckpt.lm_files if not os.path.exists(f)]
    if missing:
        raise ConversionError(f"{directory}: the index names shards that are not there: {', '.join(missing)}")
    return ckpt


def _lm_map(weight_map: dict[str, str], source: str) -> dict[str, str]:
    """{GraniteForCausalLM key: full key} of a whole checkpoint's language model, in either layout:
    `language_model.model.*` + `language_model.lm_head.weight` (published), or `model.language_model.*` +
    `lm_head.weight` (transformers 5's module tree)."""
    out = {}
    for key in weight_map:
        if key.startswith("language_model."):
            out[key[len("language_model.") :]] = key
        elif key.startswith("model.language_model."):
            out["model." + key[len("model.language_model.") :]] = key
        elif key == "lm_head.weight":
            out[key] = key
    if not any(k.startswith("model.") for k in out):
        raise ConversionError(
            f"{source}: its config describes a whole model, but it holds no language model tensors "
            "('language_model.model.*' or 'model.language_model.*'); convert with --encoder-only for the encoder "
            "and projector alone"
        )
    return out


def _wanted_prefixes(config: dict, prefix: str, language_model: bool = False) -> tuple[str, ...]:
    """The key prefixes a conversion reads: the encoder's, and the projector's or the CTC head's (and the
    language model's)."""
    if has_projector(config):
        lm = ("language_model.", "model.language_model.", "lm_head.") if language_model else ()
        return (prefix, projector_prefix_for(prefix), *lm)
    return (prefix, SPEECH5_HEAD) if is_speech5(config) else (prefix,)


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub's host answers a TCP connection within `timeout` seconds; else why not.

    huggingface_hub retries an unreachable host for about half a minute before giving up; this asks once.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return None
    except OSError as e:
        return f"cannot reach {url.hostname}: {e.strerror or e}"


def _download_from_hub(repo_id: str, *, revision: str | None, language_model: bool = False) -> str:
    """Fetch config.json, preprocessor_config.json (when the repo has one) and only the weight files holding
    encoder (and projector) tensors; return the snapshot dir. Served from the local cache when it holds them
    all; otherwise the hub is asked once whether it can be reached, so that offline fails at once."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise ConversionError("fetching from the hub needs huggingface_hub (pip install huggingface_hub)") from None

    def fetch(local_only: bool) -> str:
        def get(name: str) -> str:
            return hf_hub_download(repo_id, name, revision=revision, local_files_only=local_only)

        config_path = get("config.json")
        optional = (FEATURE_CONFIG_FILE,) + _files_for(_read_json(config_path), language_model)
        for name in optional:  # the defaults (or no tokenizer) without them
            with contextlib.suppress(EntryNotFoundError):
                get(name)
        try:
            index_path = get("model.safetensors.index.json")
        except EntryNotFoundError:
            get("model.safetensors")
        else:
            weight_map = _read_index(index_path)
            prefix = _find_prefix(weight_map, repo_id)
            wanted = _wanted_prefixes(_read_json(config_path), prefix, language_model)
            for shard in sorted({v for k, v in weight_map.items() if k.startswith(wanted)}):
                get(shard)
        return os.path.dirname(config_path)

    try:
        if _cache_has_all(repo_id, revision, language_model):
            return fetch(local_only=True)
        why = _hub_reachable()
        if why is not None:
            raise ConnectionError(why)
        return fetch(local_only=False)
    except ConversionError:
        raise
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ConversionError(
            f"{repo_id!r} is not a local directory, and could not fetch it from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Without network access, download the checkpoint elsewhere and "
            "pass its local directory."
        ) from None


def _files_for(config: dict, language_model: bool) -> tuple[str, ...]:
    if is_speech5(config):
        return TOKENIZER_FILES
    return LM_FILES if language_model and has_projector(config) else ()


def _cache_has_all(repo_id: str, revision: str | None, language_model: bool = False) -> bool:
    """Whether the local hub cache holds (or knows the absence of) every file a conversion reads."""
    from huggingface_hub import try_to_load_from_cache

    def known(name: str) -> str | bool | None:  # a path, False (known absent), None (unknown)
        hit = try_to_load_from_cache(repo_id, name, revision=revision)
        return hit if isinstance(hit, str) else (False if hit is not None else None)

    config, features, index = (known(n) for n in ("config.json", FEATURE_CONFIG_FILE, "model.safetensors.index.json"))
    if not config or features is None or index is None:
        return False
    try:
        if any(known(n) is None for n in _files_for(_read_json(config), language_model)):
            return False
    except ConversionError:
        return False
    if index is False:
        return isinstance(known("model.safetensors"), str)
    try:
        weight_map = _read_index(index)
        prefix = _find_prefix(weight_map, repo_id)
        wanted = _wanted_prefixes(_read_json(config), prefix, language_model)
    except ConversionError:
        return False
    return all(isinstance(known(v), str) for v in {v for k, v in weight_map.items() if k.startswith(wanted)})
