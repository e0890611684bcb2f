"""The 3.x speech models' q/v LoRA adapter on the language model (`adapter_config.json`,
`adapter_model.safetensors`, peft's format), which transformers enables whenever audio is given.

Generation here always has audio, so the adapter is merged into the projections it targets, once, at load:
W + (alpha / r) B A (alpha / sqrt(r) with `use_rslora`), computed in fp32 - what peft adds to each output.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from granite_jax.models.granite import GraniteForCausalLM
from granite_jax.models.granite_config import LanguageConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight")


class AdapterError(ValueError):
    """A LoRA adapter that is missing or cannot be applied; the message names the file."""


def read_adapter(files: Mapping[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, {key: array}) from the checkpoint's carried files."""
    missing = [n for n in ADAPTER_FILES if n not in files]
    if missing:
        raise AdapterError(
            f"the config sets has_lora_adapter (a 3.x model: transformers applies its LoRA adapter whenever audio "
            f"is given), but the checkpoint lacks {', '.join(missing)}: convert the whole checkpoint directory"
        )
    from granite_jax.checkpoint.safetensors_file import SafetensorsFile

    path = files["adapter_config.json"]
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    weights = SafetensorsFile(files["adapter_model.safetensors"])
    return config, {k: weights.get_tensor(k) for k in weights}


def merge_adapter(lm: GraniteForCausalLM, config: dict, weights: Mapping[str, np.ndarray], source: str = "") -> None:
    """Add the adapter's low-rank updates to `lm`'s projection weights, in place."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}adapter_config.json: peft_type {config.get('peft_type')!r} is not LORA")
    r = config.get("r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{source}adapter_config.json: r and lora_alpha must be numbers, got {r!r}, {alpha!r}")
    for name in ("fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias"):
        if config.get(name):
            raise AdapterError(f"{source}adapter_config.json: {name} adapters are not supported")
    scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{source}adapter_model.safetensors: no place for {key} (only q/k/v/o LoRA A and B)")
        pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = np.asarray(value, np.float32)
    layers = lm.model.layers
    for (i, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or not 0 <= i < len(layers):
            raise AdapterError(f"{source}adapter_model.safetensors: layer {i} {proj}_proj lacks lora_A or lora_B")
        linear = getattr(layers[i].self_attn, f"{proj}_proj")
        weight = linear.weight.get_value()
        delta = (ab["B"] @ ab["A"]) * scale  # (out, in), as the weight
        if delta.shape != weight.shape:
            raise AdapterError(
                f"{source}adapter for layer {i} {proj}_proj has shape {delta.shape}, the weight {weight.shape}"
            )
        linear.weight.set_value((weight.astype(jnp.float32) + delta).astype(weight.dtype))


def with_adapter(lm: GraniteForCausalLM, files: Mapping[str, str], lang: LanguageConfig) -> GraniteForCausalLM:
    """`lm` with its checkpoint's adapter merged (see the module docstring)."""
    del lang
    config, weights = read_adapter(files)
    merge_adapter(lm, config, weights, os.path.dirname(files["adapter_config.json"]) + "/")
    return lm
