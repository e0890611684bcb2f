"""Reading transformers' configuration files: the shared helpers of every config in the package.

`read_hf_config` takes a path, a directory, a dict or a `PretrainedConfig`; `check_positive_ints` and
`check_rate` are the one validation helper each config calls; `ConfigError` is what every config raises.
The model-type names say which family an HF config belongs to.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

# model_type values of configs that carry an `encoder_config` (and a projector) inside them.
FULL_MODEL_TYPES = ("granite_speech", "granite_speech_plus")
ENCODER_MODEL_TYPES = ("granite_speech_encoder", "granite_speech_plus_encoder")
QFORMER_MODEL_TYPE = "blip_2_qformer"
SPEECH5_CTC_MODEL_TYPE = "granite_speech5_ctc"
SPEECH5_ENCODER_MODEL_TYPE = "granite_speech5_encoder"


class ConfigError(ValueError):
    """A configuration that the reference model would reject or that makes no sense."""


def check_positive_ints(obj: Any, names: Iterable[str], what: str = "", *, allow_zero: Iterable[str] = ()) -> None:
    """Raise ConfigError unless each named field of `obj` is a positive integer (or >= 0 if in `allow_zero`).

    numpy integers are accepted and stored back as Python ints (frozen dataclasses included).
    """
    zero_ok = set(allow_zero)
    for name in names:
        value = getattr(obj, name)
        low = 0 if name in zero_ok else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            kind = "a non-negative" if low == 0 else "a positive"
            raise ConfigError(f"{what}{name} must be {kind} integer, got {value!r}")
        object.__setattr__(obj, name, int(value))


def read_hf_config(config: Any, filename: str = "config.json") -> dict:
    """An HF config given as a path (the file, or a directory holding `filename`), dict or PretrainedConfig -> dict."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, filename)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no {filename} at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
        return config
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ConfigError(f"expected a dict, a path to {filename} or a PretrainedConfig, got {type(config).__name__}")
    return config


def sub_config(config: dict, name: str) -> dict:
    sub = config.get(name)
    if sub is None:
        return {}
    if hasattr(sub, "to_dict"):
        sub = sub.to_dict()
    if not isinstance(sub, dict):
        raise ConfigError(f"{name} must be a dict, got {type(sub).__name__}")
    return sub


def known_fields(cls, config: dict, names: Iterable[str] | None = None) -> dict:
    """The entries of `config` that are fields of `cls` (or of `names`); None values mean "the default"."""
    names = set(names if names is not None else (f.name for f in dataclasses.fields(cls)))
    return {k: v for k, v in config.items() if k in names and v is not None}


def has_projector(config: dict) -> bool:
    """Whether an HF config dict describes a whole model with an audio projector (not a bare encoder)."""
    return "projector_config" in config or config.get("model_type") in FULL_MODEL_TYPES


def check_rate(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {v!r}")
    object.__setattr__(obj, name, float(v))


def is_speech5(config: dict) -> bool:
    """Whether an HF config dict is a Granite Speech 5 model or encoder."""
    return config.get("model_type") in (SPEECH5_CTC_MODEL_TYPE, SPEECH5_ENCODER_MODEL_TYPE)
