"""HF checkpoint -> granite_jax variables (in memory) and -> a granite_jax checkpoint directory."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from granite_jax.checkpoint import store as checkpoint
from granite_jax.checkpoint.store import Converted
from granite_jax.convert.key_map import PROJECTOR_KEYS, SPEECH5_KEYS, ConversionError, hf_to_flax
from granite_jax.convert.sources import open_hf_checkpoint
from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.hf_config import ConfigError, is_speech5
from granite_jax.models.conformer import abstract_params
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.projector import abstract_projector_params
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.models.speech5_config import Speech5Config

# 2: full checkpoints also convert the projector; 3: preprocessor_config.json is carried over; 4: Granite Speech 5
CONVERTER_VERSION = "4"
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


def convert_hf(src: str, *, dtype: str = "float32", progress: bool = False, revision: str | None = None) -> Converted:
    """Read the encoder (and the projector, when the config has one) of an HF checkpoint (directory or hub id).

    Returns `Converted(config, {nnx path: array}, provenance, projector_config, projector_params)`; the
    projector fields are None for a bare encoder. `dtype` is the stored dtype of every floating parameter.
    """
    target = _np_dtype(dtype)
    with open_hf_checkpoint(src, revision=revision) as ckpt:
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
        "dtype": dtype,
        "converter_version": CONVERTER_VERSION,
        "feature_config_source": "defaults" if ckpt.feature_config is None else "preprocessor_config.json",
    }
    if pcfg is not None:
        provenance["source_projector_prefix"] = ckpt.projector_prefix
    return Converted(config, params, provenance, pcfg, projector_params, features)


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
        "dtype": dtype,
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
    src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Convert SRC (HF) into DST (granite_jax), atomically. Returns the provenance written.

    Everything about DST is checked before SRC is read: it must not be or overlap SRC, and it may only
    replace an existing granite_jax checkpoint (with `overwrite`).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    _np_dtype(dtype)
    check_source_and_destination(src, dst)
    checkpoint.check_destination(dst, overwrite)
    conv = convert_hf(src, dtype=dtype, progress=progress)
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
    )
    return conv.provenance
