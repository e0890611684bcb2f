"""HF checkpoint -> granite_jax variables (in memory) and -> a granite_jax checkpoint directory."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from granite_jax.checkpoint import store as checkpoint
from granite_jax.checkpoint.store import Converted
from granite_jax.convert.key_map import LM_KEYS, PROJECTOR_KEYS, SPEECH5_KEYS, ConversionError, hf_to_flax
from granite_jax.convert.sources import open_hf_checkpoint
from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.hf_config import ConfigError, is_speech5
from granite_jax.models.conformer import abstract_params
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.granite import abstract_lm_params
from granite_jax.models.granite_config import LanguageConfig
from granite_jax.models.projector import abstract_projector_params
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.models.speech5_config import Speech5Config

# 2: full checkpoints also convert the projector; 3: preprocessor_config.json is carried over; 4: Granite Speech 5;
# 5: whole 4.x checkpoints convert the language model and carry its tokenizer, chat template and adapter along
CONVERTER_VERSION = "5"
DTYPES = ("float32", "bfloat16", "float16")


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ConversionError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _expected(abstract: dict, target: np.dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{nnx path: (shape, stored dtype)}: floating variables in `target`, counters keep their dtype."""
    return {
        k: (tuple(v.shape), target if np.issubdtype(v.dtype, np.floating) else np.dtype(v.dtype))
        for k, v in abstract.items()
    }


def convert_hf(
    src: str,
    *,
    dtype: str | None = "float32",
    progress: bool = False,
    revision: str | None = None,
    language_model: bool = True,
) -> Converted:
    """Read the encoder (and the projector, when the config has one) of an HF checkpoint (directory or hub id),
    and the language model of a whole 4.x checkpoint unless `language_model=False` (encoder and projector only).

    Returns `Converted(config, {nnx path: array}, provenance, projector_config, projector_params, ...)`; the
    projector fields are None for a bare encoder. `dtype` is the stored dtype of every floating parameter of
    the encoder and projector; the language model's too, or its shipped dtype when None. The language model's
    tensors are read lazily (`LazyConversion`): each when it is written or loaded.
    """
    target = _np_dtype(dtype or "float32")
    with open_hf_checkpoint(src, revision=revision, language_model=language_model) as ckpt:
        if is_speech5(ckpt.config):
            return _convert_speech5(src, ckpt, dtype, target, progress)
        try:
            config = EncoderConfig.from_hf_config(ckpt.config)
            pcfg = ProjectorConfig.from_hf_config(ckpt.config)
        except ConfigError as e:
            raise ConversionError(f"{ckpt.config_path}: {e}") from None
        try:
            features = (
                FeatureConfig() if ckpt.feature_config is None else FeatureConfig.from_hf_config(ckpt.feature_config)
            )
        except ConfigError as e:
            raise ConversionError(f"{ckpt.feature_config_path}: {e}") from None
        if pcfg is not None and pcfg.encoder_hidden_size != config.output_width:
            raise ConversionError(
                f"{src}: the projector's encoder_hidden_size ({pcfg.encoder_hidden_size}) is not the encoder's "
                f"output width ({config.output_width} = hidden_dim {config.hidden_dim} x "
                f"{len(config.exported_layers) + 1} for layers {list(config.exported_layers)} + the last)"
            )
        expected = _expected(abstract_params(config), target)
        files = ckpt.needed_files
        bar = None
        if progress and len(files) > 1:
            from tqdm.auto import tqdm

            total = len(ckpt.encoder_keys) + len(ckpt.projector_keys)
            bar = tqdm(total=total, unit="tensor", desc=f"reading {len(files)} shards")
        tick = bar and (lambda _: bar.update())
        try:
            params = hf_to_flax(ckpt.encoder_keys, ckpt.read, expected, on_tensor=tick)
            projector_params = None
            if pcfg is not None:
                projector_params = hf_to_flax(
                    ckpt.projector_keys,
                    ckpt.read_projector,
                    _expected(abstract_projector_params(pcfg), target),
                    table=PROJECTOR_KEYS,
                    on_tensor=tick,
                )
        finally:
            if bar is not None:
                bar.close()
        source_dtype = str(ckpt.read("input_linear.bias").dtype)
    provenance = {
        "source": os.path.abspath(src) if os.path.exists(src) else src,
        "source_prefix": ckpt.prefix,
        "source_dtype": source_dtype,
        "dtype": dtype or "float32",
        "converter_version": CONVERTER_VERSION,
        "feature_config_source": "defaults" if ckpt.feature_config is None else "preprocessor_config.json",
    }
    if pcfg is not None:
        provenance["source_projector_prefix"] = ckpt.projector_prefix
    if not ckpt.lm_map:
        return Converted(config, params, provenance, pcfg, projector_params, features)
    lang, lm_params, lm_dtype = _language_model(src, ckpt, dtype)
    provenance["language_model_dtype"] = lm_dtype
    return Converted(config, params, provenance, pcfg, projector_params, features, dict(ckpt.files), lang, lm_params)


def _language_model(src: str, ckpt, dtype: str | None):
    """(LanguageConfig, lazy {nnx path: array}, stored dtype name) of a whole 4.x checkpoint's language model.

    The head: `lm_head.weight` when the checkpoint has it; else tied to the embeddings. A saved head that a
    tied config would replace must equal the embeddings (transformers would tie them silently)."""
    try:
        lang = LanguageConfig.from_hf_config(ckpt.config)
    except ConfigError as e:
        raise ConversionError(f"{ckpt.config_path}: {e}") from None
    if lang is None:
        raise ConversionError(f"{ckpt.config_path}: a whole model needs a text_config (the language model)")
    keys = list(ckpt.lm_keys)
    embed = "model.embed_tokens.weight"
    if embed not in keys:
        raise ConversionError(f"{src}: the language model has no {embed}")
    if "lm_head.weight" in keys and ckpt.config.get("tie_word_embeddings", True):
        if not np.array_equal(ckpt.read_lm("lm_head.weight"), ckpt.read_lm(embed)):
            raise ConversionError(
                f"{src}: lm_head.weight differs from the embeddings although tie_word_embeddings is set "
                "(transformers would tie them)"
            )
        keys.remove("lm_head.weight")
    text = dataclasses.replace(lang.text, tie_word_embeddings="lm_head.weight" not in keys)
    lang = dataclasses.replace(lang, text=text)
    stored = dtype or _stored_dtype(ckpt.lm_dtype(embed))
    expected = _expected(abstract_lm_params(text), _np_dtype(stored))
    params = hf_to_flax(keys, ckpt.read_lm, expected, table=LM_KEYS, lazy=True, shape_of=ckpt.lm_shape)
    return lang, params, stored


def _stored_dtype(name: str | None) -> str:
    """The conversion dtype for a tensor stored as `name` (safetensors code or numpy name)."""
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "bfloat16": "bfloat16"}.get(
        name or "", name if name in DTYPES else "float32"
    )


def _convert_speech5(src: str, ckpt, dtype: str, target: np.dtype, progress: bool) -> Converted:
    """The Granite Speech 5 branch of `convert_hf`: the encoder, the CTC head unless tied, the front end's
    settings and the tokenizer's files."""
    from granite_jax.models import speech5

    try:
        config = Speech5Config.from_hf_config(ckpt.config)
    except ConfigError as e:
        raise ConversionError(f"{ckpt.config_path}: {e}") from None
    try:
        features = (
            Speech5FeatureConfig(num_mel_bins=config.num_mel_bins)
            if ckpt.feature_config is None
            else Speech5FeatureConfig.from_hf_config(ckpt.feature_config)
        )
    except ConfigError as e:
        raise ConversionError(f"{ckpt.feature_config_path}: {e}") from None
    if features.num_mel_bins != config.num_mel_bins:
        raise ConversionError(
            f"{ckpt.feature_config_path}: num_mel_bins {features.num_mel_bins} differs from the encoder's "
            f"{config.num_mel_bins}"
        )
    keys = list(ckpt.encoder_keys)
    head = [k for k in ckpt.extra_keys if k.startswith("ctc_head.")]
    if config.tie_word_embeddings:  # the head is encoder.out; a saved copy must agree with it
        for key in head:
            if not np.array_equal(ckpt.read_full(key), ckpt.read(key.replace("ctc_head.", "out."))):
                raise ConversionError(
                    f"{src}: {key} differs from encoder.{key.replace('ctc_head.', 'out.')} although "
                    "tie_word_embeddings is set (transformers would tie them)"
                )
    else:
        keys += head

    def read(key: str) -> np.ndarray:
        return ckpt.read_full(key) if key.startswith("ctc_head.") else ckpt.read(key)

    bar = None
    if progress and len(ckpt.needed_files) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), unit="tensor", desc=f"reading {len(ckpt.needed_files)} shards")
    try:
        expected = _expected(speech5.abstract_params(config), target)
        params = hf_to_flax(keys, read, expected, table=SPEECH5_KEYS, on_tensor=bar and (lambda _: bar.update()))
    finally:
        if bar is not None:
            bar.close()
    provenance = {
        "source": os.path.abspath(src) if os.path.exists(src) else src,
        "source_prefix": ckpt.prefix,
        "source_dtype": str(ckpt.read("input_linear.bias").dtype),
        "dtype": dtype or "float32",
        "converter_version": CONVERTER_VERSION,
        "feature_config_source": "defaults" if ckpt.feature_config is None else "preprocessor_config.json",
        "model": "granite_speech5",
    }
    return Converted(config, params, provenance, None, None, features, dict(ckpt.files))


def check_source_and_destination(src: str, dst: str) -> None:
    """Refuse a DST that is SRC, holds SRC or lies inside it (whatever --overwrite says): the conversion would
    replace or corrupt the Hugging Face checkpoint it reads."""
    if not os.path.exists(src):
        return  # a hub id
    real_src, real_dst = pathlib.Path(os.path.realpath(src)), pathlib.Path(os.path.realpath(dst))
    if real_dst == real_src:
        raise ConversionError(f"DST {dst} is the source checkpoint {src}; choose another destination")
    if real_dst.is_relative_to(real_src):
        raise ConversionError(f"DST {dst} lies inside the source checkpoint {src}; choose another destination")
    if real_src.is_relative_to(real_dst):
        raise ConversionError(f"DST {dst} holds the source checkpoint {src}; choose another destination")


def convert_checkpoint(
    src: str,
    dst: str,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    language_model: bool = True,
) -> dict[str, Any]:
    """Convert SRC (HF) into DST (granite_jax), atomically. Returns the provenance written.

    `dtype`: of every stored floating parameter; None keeps the encoder and projector in float32 and the
    language model in its shipped dtype. `language_model=False` keeps only the encoder and projector of a
    whole checkpoint (the embeddings alone). Everything about DST is checked before SRC is read: it must not
    be or overlap SRC, and it may only replace an existing granite_jax checkpoint (with `overwrite`).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype is not None:
        _np_dtype(dtype)
    check_source_and_destination(src, dst)
    checkpoint.check_destination(dst, overwrite)
    conv = convert_hf(src, dtype=dtype, progress=progress, language_model=language_model)
    lm_params = conv.language_params
    bar = None
    if progress and lm_params is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lm_params), unit="tensor", desc="language model")
        lm_params = _Counted(lm_params, bar.update)
    try:
        checkpoint.save(
            dst,
            conv.config,
            conv.params,
            conv.provenance,
            overwrite=overwrite,
            projector_config=conv.projector_config,
            projector_params=conv.projector_params,
            feature_config=conv.feature_config,
            files=conv.files,
            language_config=conv.language_config,
            language_params=lm_params,
        )
    finally:
        if bar is not None:
            bar.close()
    return conv.provenance


class _Counted(Mapping):
    """A mapping that calls `tick()` on every read (a progress bar over a lazy conversion)."""

    def __init__(self, inner: Mapping, tick):
        self._inner, self._tick = inner, tick

    def __getitem__(self, key):
        value = self._inner[key]
        self._tick()
        return value

    def __iter__(self):
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def dtype_of(self, key):
        return self._inner.dtype_of(key)
