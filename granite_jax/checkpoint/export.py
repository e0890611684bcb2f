"""Back to Hugging Face: a converted (or fine-tuned) model as a directory that transformers (and vLLM) load.

- Bare: `config.json` and `model.safetensors` of a `GraniteSpeech(Plus)CTCEncoder`; for Granite Speech 5 a
  whole `GraniteSpeech5ForCTC` with its front end and tokenizer; for a runner with its language model the
  whole `GraniteSpeech(Plus)ForConditionalGeneration` with its tokenizer, chat template and generation config
  (the language model in the published layout, `language_model.model.*`; a 3.x adapter merged).
- With `base` (the original full checkpoint): the whole `GraniteSpeech(Plus)ForConditionalGeneration`
  directory, the encoder (and projector) tensors replaced by these and every other tensor and file copied
  through, streamed one shard at a time (never the whole model in memory), each tensor in the base's dtype.
Written atomically; LoRA adapters are merged (into a copy: the model passed in is not changed).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from flax import nnx

from granite_jax.checkpoint import atomic
from granite_jax.checkpoint.safetensors_file import SafetensorsFile
from granite_jax.convert.key_map import (
    ENCODER_KEYS,
    LM_KEYS,
    PROJECTOR_KEYS,
    SPEECH5_KEYS,
    ConversionError,
    flax_to_hf,
)
from granite_jax.convert.sources import ENCODER_PREFIXES, projector_prefix_for
from granite_jax.frontend.config import Speech5FeatureConfig
from granite_jax.hf_config import ConfigError, is_speech5, read_hf_config
from granite_jax.models import speech5
from granite_jax.models.conformer import GraniteSpeechEncoder, params_of
from granite_jax.models.projector import GraniteSpeechProjector, projector_params_of
from granite_jax.models.speech5 import GraniteSpeech5Encoder
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.text.tokenizer import TOKENIZER_FILES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


class ExportError(ValueError):
    """A model and a base checkpoint that do not fit together, or a destination that cannot be written."""


def _merged(model: GraniteSpeechEncoder) -> GraniteSpeechEncoder:
    from granite_jax.train import lora

    if not lora.has_lora(model):
        return model
    copy = nnx.clone(model)
    lora.merge_lora(copy)
    return copy


def encoder_state_dict(model, prefix: str = "") -> dict[str, np.ndarray]:
    """The encoder's tensors under HF's names and layouts (`prefix` + key), LoRA merged. For Granite Speech 5
    the untied CTC head goes beside the encoder, as `ctc_head.*`."""
    model = _merged(model)
    if not isinstance(model, GraniteSpeech5Encoder):
        return flax_to_hf(params_of(model), prefix=prefix, table=ENCODER_KEYS)
    flat = speech5.params_of(model)
    head = {k: v for k, v in flat.items() if k.startswith("ctc_head.")}
    out = flax_to_hf({k: v for k, v in flat.items() if k not in head}, prefix=prefix, table=SPEECH5_KEYS)
    out.update(flax_to_hf(head, table=SPEECH5_KEYS))
    return out


def _unwrap(model: Any) -> tuple[Any, GraniteSpeechProjector | None, Any]:
    """(encoder, projector, runner or None)."""
    if isinstance(model, GraniteSpeechEncoder | GraniteSpeech5Encoder):
        return model, None, None
    if hasattr(model, "model") and isinstance(model.model, GraniteSpeechEncoder | GraniteSpeech5Encoder):
        return model.model, getattr(model, "projector", None), model
    raise TypeError(f"export_hf takes a granite_jax Runner (from load) or a GraniteSpeechEncoder, got {type(model)}")


def export_hf(
    model: Any,
    dst: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write `model` (a Runner or a GraniteSpeechEncoder) as a Hugging Face directory at `dst`; return it.

    `dtype`: of the written floating tensors ("float32", "bfloat16", "float16"); default: the base's own
    dtypes with `base`, else float32.
    """
    encoder, projector, runner = _unwrap(model)
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if os.path.exists(dst) and os.listdir(dst) and not os.path.isfile(os.path.join(dst, "config.json")):
        raise ExportError(f"{dst} exists and is not a Hugging Face checkpoint (no config.json); not replacing it")
    target = _np_dtype(dtype)
    lm = getattr(runner, "language_model", None)
    if base is None:
        if lm is not None:
            return _export_whole(encoder, projector, runner, dst, target or np.dtype(np.float32))
        return _export_bare(encoder, dst, target or np.dtype(np.float32), runner)
    base = os.path.abspath(os.fspath(base))
    if os.path.realpath(base) == os.path.realpath(dst):
        raise ExportError(f"DST {dst} is the base checkpoint; choose another destination")
    if lm is not None and runner.language_config.has_lora_adapter:
        lm = None  # merged with its adapter: the base's own tensors and adapter files are copied through instead
    return _export_with_base(encoder, projector, dst, base, target, lm)


def _np_dtype(name: str | None) -> np.dtype | None:
    if name is None:
        return None
    from granite_jax.convert.convert import _np_dtype as convert_dtype

    return convert_dtype(name)


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if value.dtype.kind in "iub":
        return value
    return np.ascontiguousarray(np.asarray(value, np.float32).astype(dtype))


def _export_bare(encoder, dst: str, dtype: np.dtype, runner: Any = None) -> str:
    """4.x: a GraniteSpeech(Plus)CTCEncoder directory. Speech 5: a whole GraniteSpeech5ForCTC (its config,
    weights, front end and tokenizer)."""
    from safetensors.numpy import save_file

    cfg = encoder.config
    config = cfg.to_hf_dict()
    speech5_model = isinstance(encoder, GraniteSpeech5Encoder)
    if not speech5_model:
        config["architectures"] = ["GraniteSpeechPlusCTCEncoder" if cfg.is_plus else "GraniteSpeechCTCEncoder"]
    config["torch_dtype"] = "bfloat16" if dtype.name == "bfloat16" else str(dtype)
    tensors = {k: _cast(v, dtype) for k, v in encoder_state_dict(encoder, "encoder." if speech5_model else "").items()}
    with atomic.atomic_dir(dst, replace=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if runner is not None:
            fc = runner.feature_config
            features = (
                fc.to_hf_dict() if isinstance(fc, Speech5FeatureConfig) else fc.to_hf_dict(runner.projector_config)
            )
            with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
                json.dump(features, f, indent=2, sort_keys=True)
            tok = getattr(runner, "tokenizer", None)
            for name in TOKENIZER_FILES if tok is not None else ():
                if os.path.isfile(os.path.join(tok.source, name)):
                    shutil.copy2(os.path.join(tok.source, name), os.path.join(tmp, name))
    return dst


def language_model_state_dict(lm, layout: str = "language_model.") -> dict[str, np.ndarray]:
    """The language model's tensors under HF's names: `language_model.model.*` and `language_model.lm_head.weight`
    (published layout), or with `layout="model.language_model."` transformers 5's (`lm_head.weight` on top)."""
    from granite_jax.models.granite import lm_params_of

    out = {}
    for key, value in flax_to_hf(lm_params_of(lm), table=LM_KEYS).items():
        if layout == "language_model.":
            out["language_model." + key] = value
        else:
            out["lm_head.weight" if key == "lm_head.weight" else layout + key.removeprefix("model.")] = value
    return out


def _export_whole(encoder, projector, runner, dst: str, dtype: np.dtype) -> str:
    """A whole GraniteSpeech(Plus)ForConditionalGeneration directory, from the runner alone."""
    from safetensors.numpy import save_file

    cfg, pcfg, lang = encoder.config, runner.projector_config, runner.language_config
    config = {
        "model_type": "granite_speech_plus" if cfg.is_plus else "granite_speech",
        "architectures": [
            "GraniteSpeechPlusForConditionalGeneration" if cfg.is_plus else "GraniteSpeechForConditionalGeneration"
        ],
        "encoder_config": cfg.to_hf_dict(),
        **pcfg.to_hf_dict(),
        **lang.to_hf_dict(),
        "has_lora_adapter": False,  # merged
        "tie_word_embeddings": lang.text.tie_word_embeddings,
        "torch_dtype": "bfloat16" if dtype.name == "bfloat16" else str(dtype),
    }
    tensors = encoder_state_dict(encoder, "encoder.")
    tensors.update(flax_to_hf(projector_params_of(projector), prefix="projector.", table=PROJECTOR_KEYS))
    tensors.update(language_model_state_dict(runner.language_model))
    tensors = {k: _cast(v, dtype) for k, v in tensors.items()}
    with atomic.atomic_dir(dst, replace=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(runner.feature_config.to_hf_dict(pcfg), f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, path in (runner.carried_files or {}).items():
            if not name.startswith("adapter_"):
                shutil.copy2(path, os.path.join(tmp, name))
    return dst


def _export_with_base(
    encoder: GraniteSpeechEncoder,
    projector: GraniteSpeechProjector | None,
    dst: str,
    base: str,
    dtype,
    lm=None,
) -> str:
    from safetensors.numpy import save_file

    from granite_jax.convert.sources import _weight_map
    from granite_jax.models.conformer_config import EncoderConfig

    try:
        config = read_hf_config(base)
        base_cfg = (Speech5Config if is_speech5(config) else EncoderConfig).from_hf_config(config)
    except ConfigError as e:
        raise ExportError(f"base {base}: {e}") from None
    if base_cfg != encoder.config:
        raise ExportError(
            f"the base's encoder config differs from this model's:\n  base {base_cfg}\n  this {encoder.config}"
        )
    weight_map = _weight_map(base)
    if any(not f.endswith(".safetensors") for f in set(weight_map.values())):
        raise ExportError(f"base {base} is not in safetensors; convert it (transformers save_pretrained) first")
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in weight_map)), None)
    if prefix is None:
        raise ExportError(f"base {base} holds no encoder tensors under {ENCODER_PREFIXES}")
    ours = encoder_state_dict(encoder, prefix)
    proj_prefix = projector_prefix_for(prefix)
    if projector is not None:
        ours.update(flax_to_hf(projector_params_of(projector), prefix=proj_prefix, table=PROJECTOR_KEYS))
    beside = (
        (proj_prefix,)
        if projector is not None
        else ("ctc_head.",)
        if isinstance(encoder, GraniteSpeech5Encoder)
        else ()
    )
    if lm is not None:
        layout = "model.language_model." if any(k.startswith("model.language_model.") for k in weight_map) else None
        ours.update(language_model_state_dict(lm, layout or "language_model."))
        beside += ("language_model.", "model.language_model.", "lm_head.")
    theirs = {k for k in weight_map if k.startswith((prefix,) + beside)}
    if isinstance(encoder, GraniteSpeech5Encoder) and encoder.config.tie_word_embeddings:
        for k in [k for k in theirs if k.startswith("ctc_head.")]:  # a saved copy of the tied head: keep it equal
            theirs.discard(k)
            ours[k] = ours[prefix + k.replace("ctc_head.", "out.")]
            theirs.add(k)
    if set(ours) != theirs:
        missing, extra = sorted(theirs - set(ours)), sorted(set(ours) - theirs)
        raise ExportError(
            f"this model's tensors do not match the base's: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    files = sorted(set(weight_map.values()))
    with atomic.atomic_dir(dst, replace=True) as tmp:
        for name in sorted(os.listdir(base)):  # everything but the weights, copied through
            src = os.path.join(base, name)
            if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(src, os.path.join(tmp, name))
        for path in files:  # one shard at a time
            shard = SafetensorsFile(path)
            tensors = {}
            for key in shard:
                value = shard.get_tensor(key)
                if key in ours:
                    new = ours[key]
                    if new.shape != value.shape:
                        raise ConversionError(f"{key}: this model's shape {new.shape}, the base's {value.shape}")
                    value = (
                        _cast(new, dtype or value.dtype) if value.dtype.kind not in "iub" else new.astype(value.dtype)
                    )
                elif dtype is not None:
                    value = _cast(value, dtype)
                tensors[key] = value
            save_file(tensors, os.path.join(tmp, os.path.basename(path)), metadata=shard.metadata or {"format": "pt"})
            del tensors
        if dtype is not None:
            _restate_dtype(tmp, dtype)
    return dst


def _restate_dtype(folder: str, dtype: np.dtype) -> None:
    """After a dtype change: the index's total_size and config.json's dtype say what was written."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        total = 0
        for name in sorted(set(index["weight_map"].values())):
            shard = SafetensorsFile(os.path.join(folder, name))
            total += sum(int(np.prod(shard.shape(k))) * _ITEMSIZE[shard.dtype(k)] for k in shard)
        index.setdefault("metadata", {})["total_size"] = total
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    config_path = os.path.join(folder, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    name = "bfloat16" if dtype.name == "bfloat16" else str(dtype)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
