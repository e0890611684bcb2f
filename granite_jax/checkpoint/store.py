"""granite_jax's on-disk format: a directory with the encoder config, the NNX variables as safetensors
and provenance. No pickle. Written atomically: a failed write leaves nothing behind.

    DST/config.json             HF encoder config (HF field names; readable by transformers too)
    DST/params.safetensors      NNX variables keyed by module path, e.g. layers.0.attn.to_q.kernel; the
                                projector's (if any) under `projector.`, e.g. projector.linear.kernel
    DST/projector_config.json   only with a projector: ProjectorConfig.to_hf_dict() (the full HF config's
                                projector_config, window_size, downsample_rate, text_config.hidden_size)
    DST/preprocessor_config.json  the feature extractor's settings, as HF's `GraniteSpeechFeatureExtractor`
                                writes them (the source's, or the defaults when it had none)
    DST/language_config.json    only with a language model: LanguageConfig.to_hf_dict() (the full HF config's
                                text_config, audio_token_index, has_lora_adapter)
    DST/language_model.safetensors  its NNX variables (model.layers.0.self_attn.q_proj.weight, ... held (out,
                                in) as torch holds them), written one tensor at a time; a directory written
                                when they were `*.kernel` (in, out) still loads, transposed on read
    DST/tokenizer.json, chat_template.jinja, generation_config.json, adapter_*.json|safetensors, ...
                                carried over from the source as they are (`CARRIED_FILES`)
    DST/granite_jax.json        format version, source, dtype, converter version, time

The projector, the feature settings and the language model are additions within format version 1:
directories without them still load (no projector; the default feature settings; no language model).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from granite_jax.checkpoint import atomic
from granite_jax.checkpoint.safetensors_file import SafetensorsFile, write_streamed
from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.hf_config import ConfigError, is_speech5, read_hf_config
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.granite_config import LanguageConfig
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.models.speech5_config import Speech5Config

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PROJECTOR_CONFIG_FILE = "projector_config.json"
PARAMS_FILE = "params.safetensors"
FEATURE_CONFIG_FILE = "preprocessor_config.json"
META_FILE = "granite_jax.json"
PROJECTOR_PREFIX = "projector."  # the projector's NNX paths in params.safetensors
LANGUAGE_CONFIG_FILE = "language_config.json"
LANGUAGE_PARAMS_FILE = "language_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # Speech 5
# Read as maps of the file: only the rows a run looks up become resident (all of them only when the head is tied).
MAPPED_LANGUAGE_PARAMS = frozenset({"model.embed_tokens.embedding"})
CARRIED_FILES = TOKENIZER_FILES + (  # a whole 4.x model's
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "out_llm.safetensors",
)


class Converted(NamedTuple):
    """A converted model, what `convert_hf` and `load` return.

    `params` are the encoder's {NNX path: array}; `projector_params` the projector's {NNX path: array}
    (paths without `projector.`), both possibly lazy. The projector fields are None for a bare encoder.
    """

    config: EncoderConfig
    params: Mapping[str, np.ndarray]
    provenance: dict[str, Any]
    projector_config: ProjectorConfig | None = None
    projector_params: Mapping[str, np.ndarray] | None = None
    feature_config: FeatureConfig | Speech5FeatureConfig = FeatureConfig()
    files: Mapping[str, str] = {}  # name -> path of files carried along (the tokenizer's, the chat template, ...)
    language_config: LanguageConfig | None = None
    language_params: Mapping[str, np.ndarray] | None = None  # GraniteForCausalLM's {NNX path: array}, lazy


class CheckpointError(ValueError):
    """A granite_jax checkpoint directory that cannot be written or read."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by `save` (granite-jax-convert)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def save(
    dst: str | os.PathLike,
    config: EncoderConfig,
    params: Mapping[str, np.ndarray],
    provenance: dict[str, Any],
    *,
    overwrite: bool = False,
    projector_config: ProjectorConfig | None = None,
    projector_params: Mapping[str, np.ndarray] | None = None,
    feature_config: FeatureConfig | Speech5FeatureConfig = FeatureConfig(),
    files: Mapping[str, str] | None = None,
    language_config: LanguageConfig | None = None,
    language_params: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write a checkpoint directory atomically (temp dir + rename); refuse to replace one unless `overwrite`
    (and then only a granite_jax checkpoint: see `check_destination`). Permissions follow the umask.

    `projector_config` and `projector_params` (NNX paths without `projector.`) come together or not at all.
    """
    from safetensors.numpy import save_file

    if (projector_config is None) != (projector_params is None):
        raise CheckpointError("projector_config and projector_params must be given together")
    if (language_config is None) != (language_params is None):
        raise CheckpointError("language_config and language_params must be given together")
    clash = [k for k in params if k.startswith(PROJECTOR_PREFIX)]
    if clash:
        raise CheckpointError(f"encoder parameter names must not start with {PROJECTOR_PREFIX!r}: {clash}")
    dst = check_destination(dst, overwrite)
    with atomic.atomic_dir(dst, replace=True) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), config.to_hf_dict())
        arrays = {k: np.require(v, requirements="C") for k, v in params.items()}  # keeps 0-d arrays 0-d
        if projector_config is not None:
            _write_json(os.path.join(tmp, PROJECTOR_CONFIG_FILE), projector_config.to_hf_dict())
            arrays.update({PROJECTOR_PREFIX + k: np.require(v, requirements="C") for k, v in projector_params.items()})
        if isinstance(feature_config, Speech5FeatureConfig):
            _write_json(os.path.join(tmp, FEATURE_CONFIG_FILE), feature_config.to_hf_dict())
        else:
            _write_json(os.path.join(tmp, FEATURE_CONFIG_FILE), feature_config.to_hf_dict(projector_config))
        for name, source in (files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        save_file(arrays, os.path.join(tmp, PARAMS_FILE), metadata={"format": "granite_jax"})
        del arrays
        if language_config is not None:
            _write_json(os.path.join(tmp, LANGUAGE_CONFIG_FILE), language_config.to_hf_dict())
            _write_language_model(os.path.join(tmp, LANGUAGE_PARAMS_FILE), language_config, language_params)
        meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta.update(provenance)
        _write_json(os.path.join(tmp, META_FILE), meta)


def _write_language_model(path: str, config: LanguageConfig, params: Mapping[str, np.ndarray]) -> None:
    """The language model's variables, one tensor at a time (each read from `params` only when written)."""
    from granite_jax.models.granite import abstract_lm_params

    abstract = abstract_lm_params(config.text)
    if set(params) != set(abstract):
        missing, extra = sorted(set(abstract) - set(params)), sorted(set(params) - set(abstract))
        raise CheckpointError(f"language model parameters do not fit its config: missing {missing}, extra {extra}")
    first = next(iter(params.values())) if isinstance(params, dict) else None
    dtype = first.dtype if first is not None else None

    def spec(name):
        shape = tuple(abstract[name].shape)
        return shape, dtype if dtype is not None else _dtype_of(params, name)

    specs = {name: spec(name) for name in abstract}
    write_streamed(path, specs, lambda name: np.asarray(params[name]), metadata={"format": "granite_jax"})


def _dtype_of(params: Mapping[str, np.ndarray], name: str) -> np.dtype:
    """The stored dtype of one entry of a lazy mapping (its `dtype_of`, else reading it)."""
    dtype_of = getattr(params, "dtype_of", None)
    return np.dtype(dtype_of(name)) if dtype_of is not None else np.asarray(params[name]).dtype


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def check_destination(dst: str | os.PathLike, overwrite: bool) -> str:
    """The absolute DST once it is safe to write: absent, or (with `overwrite`) an existing granite_jax
    checkpoint or an empty folder, under a folder that can be written. Anything else raises CheckpointError:
    `--overwrite` never replaces a folder that this library did not write."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise CheckpointError(f"{dst} exists and is not a folder; not replacing it")
        if not is_checkpoint(dst) and os.listdir(dst):
            raise CheckpointError(
                f"{dst} exists and is not a granite_jax checkpoint (no {META_FILE}); --overwrite only replaces "
                "one, so choose another destination or remove it yourself"
            )
    ancestor = os.path.dirname(dst)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {dst}: {ancestor} is not a writable folder")
    return dst


class LazyParams(Mapping):
    """{path: array} over a params.safetensors file, each tensor read only when asked for.

    With `prefix`, only the tensors under it (the prefix stripped); `exclude` drops those under it. Each read
    is a fresh array that nothing else holds (`fresh_arrays`): a module built from it may keep it as its own.
    The keys in `mapped` are copy-on-write maps of the file where their data is aligned
    (`SafetensorsFile.get_mapped`): only the pages a run touches become resident.
    """

    fresh_arrays = True

    def __init__(
        self,
        file: str | SafetensorsFile,
        *,
        prefix: str = "",
        exclude: str | None = None,
        mapped: frozenset[str] = frozenset(),
    ):
        self._file = file if isinstance(file, SafetensorsFile) else SafetensorsFile(file)
        self._prefix = prefix
        self._mapped = mapped
        n, names = len(prefix), self._file.keys()
        self._keys = tuple(k[n:] for k in names if k.startswith(prefix) and not (exclude and k.startswith(exclude)))
        self._key_set = frozenset(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        if key in self._mapped:
            value = self._file.get_mapped(self._prefix + key)
            if value is not None:
                return value
        return self._file.get_tensor(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def dtype_of(self, key: str) -> np.dtype:
        from granite_jax.checkpoint.safetensors_file import _NUMPY

        return _NUMPY[self._file.dtype(self._prefix + key)]

    def __len__(self) -> int:
        return len(self._keys)


class TransposedKernels(Mapping):
    """A language model written before its dense layers were held as torch holds them: each `*.kernel` (in, out)
    read as the `*.weight` (out, in) that the model now has, transposed on read."""

    fresh_arrays = True

    def __init__(self, params: LazyParams):
        self._params = params
        self._names = {(k[: -len("kernel")] + "weight" if k.endswith(".kernel") else k): k for k in params}

    def __getitem__(self, key: str) -> np.ndarray:
        stored = self._names[key]
        value = self._params[stored]
        return np.ascontiguousarray(value.T) if stored != key else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def dtype_of(self, key: str) -> np.dtype:
        return self._params.dtype_of(self._names[key])

    def __len__(self) -> int:
        return len(self._names)


def _read_config(cls, path: str, name: str):
    """`cls.from_hf_config` of the checkpoint's file `name`, its errors naming the file."""
    file = os.path.join(path, name)
    try:
        return read_hf_config(file, name) if cls is None else cls.from_hf_config(file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}" if file not in str(e) else str(e)) from None


def load(path: str | os.PathLike) -> Converted:
    """A checkpoint directory as `Converted(config, params, provenance, projector_config, projector_params)`,
    the parameters lazy ({path: array}, read on access); the projector fields are None without one."""
    path = os.fspath(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a granite_jax checkpoint (no {META_FILE})")
    try:
        meta = read_hf_config(os.path.join(path, META_FILE), META_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a readable granite_jax checkpoint: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}; this granite_jax reads {FORMAT_VERSION}"
        )
    raw = _read_config(None, path, CONFIG_FILE)
    speech5 = is_speech5(raw)
    config = _read_config(Speech5Config if speech5 else EncoderConfig, path, CONFIG_FILE)
    file = SafetensorsFile(os.path.join(path, PARAMS_FILE))
    params = LazyParams(file, exclude=PROJECTOR_PREFIX)
    projector_config = projector_params = None
    if os.path.exists(os.path.join(path, PROJECTOR_CONFIG_FILE)):
        projector_config = _read_config(ProjectorConfig, path, PROJECTOR_CONFIG_FILE)
        if projector_config is None:
            raise CheckpointError(f"{path}/{PROJECTOR_CONFIG_FILE} holds no projector config")
        projector_params = LazyParams(file, prefix=PROJECTOR_PREFIX)
    elif any(name.startswith(PROJECTOR_PREFIX) for name in file):
        raise CheckpointError(f"{path} has projector parameters but no {PROJECTOR_CONFIG_FILE}")
    features = Speech5FeatureConfig if speech5 else FeatureConfig
    feature_config = features(num_mel_bins=config.num_mel_bins) if speech5 else FeatureConfig()
    if os.path.exists(os.path.join(path, FEATURE_CONFIG_FILE)):
        feature_config = _read_config(features, path, FEATURE_CONFIG_FILE)
    files = {n: os.path.join(path, n) for n in CARRIED_FILES if os.path.isfile(os.path.join(path, n))}
    language_config = language_params = None
    if os.path.exists(os.path.join(path, LANGUAGE_CONFIG_FILE)):
        file = os.path.join(path, LANGUAGE_CONFIG_FILE)
        try:
            language_config = LanguageConfig.from_granite_jax(read_hf_config(file, LANGUAGE_CONFIG_FILE))
        except ConfigError as e:
            raise CheckpointError(f"{file}: {e}") from None
        language_params = LazyParams(os.path.join(path, LANGUAGE_PARAMS_FILE), mapped=MAPPED_LANGUAGE_PARAMS)
        if any(k.endswith(".kernel") for k in language_params):
            language_params = TransposedKernels(language_params)
    return Converted(
        config,
        params,
        meta,
        projector_config,
        projector_params,
        feature_config,
        files,
        language_config,
        language_params,
    )
