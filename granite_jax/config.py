"""Frozen encoder configuration with Hugging Face's field names."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type values of configs that carry an `encoder_config` inside them.
_FULL_MODEL_TYPES = ("granite_speech", "granite_speech_plus")
_ENCODER_MODEL_TYPES = ("granite_speech_encoder", "granite_speech_plus_encoder")


class ConfigError(ValueError):
    """An encoder configuration that the reference model would reject or that makes no sense."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """`GraniteSpeechEncoderConfig` / `GraniteSpeechPlusEncoderConfig` as a frozen, validated dataclass.

    Field names and defaults are Hugging Face's, so `from_hf_config(hf.to_dict())` is lossless.
    `cat_hidden_layers` is only set for the *plus* variant: layer indices (0 = the input projection,
    i = the output of block i) whose hidden states are concatenated before the final one.
    """

    input_dim: int = 160
    num_layers: int = 10
    hidden_dim: int = 1024
    feedforward_mult: int = 4
    num_heads: int = 8
    dim_head: int | None = None
    output_dim: int = 42
    context_size: int = 200
    max_pos_emb: int = 512
    dropout: float = 0.1
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2
    cat_hidden_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "input_dim",
            "hidden_dim",
            "feedforward_mult",
            "num_heads",
            "output_dim",
            "context_size",
            "max_pos_emb",
            "conv_kernel_size",
            "conv_expansion_factor",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ConfigError(f"num_layers must be a non-negative integer, got {self.num_layers!r}")
        if self.dim_head is None:
            if self.hidden_dim // self.num_heads <= 0:
                raise ConfigError(
                    f"hidden_dim // num_heads is {self.hidden_dim // self.num_heads}; set dim_head explicitly"
                )
            object.__setattr__(self, "dim_head", self.hidden_dim // self.num_heads)
        elif not isinstance(self.dim_head, int) or self.dim_head <= 0:
            raise ConfigError(f"dim_head must be a positive integer, got {self.dim_head!r}")
        if self.context_size > self.max_pos_emb:
            raise ConfigError(
                f"context_size ({self.context_size}) exceeds max_pos_emb ({self.max_pos_emb}): the relative "
                "position table cannot cover a block"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.cat_hidden_layers is not None:
            layers = tuple(self.cat_hidden_layers)
            for idx in layers:
                if not isinstance(idx, int) or not 0 <= idx <= self.num_layers:
                    raise ConfigError(
                        f"cat_hidden_layers entry {idx!r} is out of range [0, {self.num_layers}] "
                        "(0 is the input projection, i the output of block i)"
                    )
            object.__setattr__(self, "cat_hidden_layers", layers)

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        """Width of the attention projections (heads x dim_head); may differ from hidden_dim."""
        return self.num_heads * self.dim_head  # type: ignore[operator]

    @property
    def self_conditioning_layer(self) -> int:
        """1-based block after which CTC self-conditioning runs; 0 means never (num_layers < 2)."""
        return self.num_layers // 2

    @property
    def exported_layers(self) -> tuple[int, ...]:
        """Hidden states the plus variant concatenates, in the order the reference does (layer order)."""
        return tuple(sorted(set(self.cat_hidden_layers or ())))

    @property
    def output_width(self) -> int:
        """Width of `encode_features`' output: hidden_dim, times (exported layers + 1) for plus."""
        return self.hidden_dim * (len(self.exported_layers) + 1)

    @property
    def is_plus(self) -> bool:
        return self.cat_hidden_layers is not None

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any) -> EncoderConfig:
        """Build from an HF config: a path to `config.json` or a directory, a dict, or a `PretrainedConfig`.

        Accepts a bare encoder config or a full `GraniteSpeech(Plus)Config` (its `encoder_config`).
        """
        config = read_hf_config(config)
        model_type = config.get("model_type")
        if "encoder_config" in config or model_type in _FULL_MODEL_TYPES:
            enc = config.get("encoder_config")
            if not isinstance(enc, dict):
                raise ConfigError(f"config of model_type {model_type!r} has no encoder_config")
            config = enc
            model_type = config.get("model_type")
        if model_type is not None and model_type not in _ENCODER_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Granite Speech encoder (expected one of "
                f"{_ENCODER_MODEL_TYPES + _FULL_MODEL_TYPES})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("cat_hidden_layers") is not None:
            kwargs["cat_hidden_layers"] = tuple(kwargs["cat_hidden_layers"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF encoder config dict (what `config.json` of a bare HF encoder holds)."""
        d = dataclasses.asdict(self)
        if self.cat_hidden_layers is None:
            d.pop("cat_hidden_layers")
            d["model_type"] = "granite_speech_encoder"
        else:
            d["cat_hidden_layers"] = list(self.cat_hidden_layers)
            d["model_type"] = "granite_speech_plus_encoder"
        return d


# The released encoders (granite-4.0-1b-speech, granite-speech-4.1-2b and -plus); 3.3 differs in output_dim.
PRODUCTION = EncoderConfig(
    input_dim=160,
    num_layers=16,
    hidden_dim=1024,
    feedforward_mult=4,
    num_heads=8,
    dim_head=128,
    output_dim=348,
    context_size=200,
    max_pos_emb=512,
    conv_kernel_size=15,
    conv_expansion_factor=2,
)


# Q-Former activations (transformers' ACT2FN names) the projector implements exactly.
PROJECTOR_ACTIVATIONS = (
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
)
_QFORMER_MODEL_TYPE = "blip_2_qformer"
# Defaults transformers fills in when a full config leaves a sub-config out (Blip2QFormerConfig, GraniteConfig).
_QFORMER_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    cross_attention_frequency=2,
    encoder_hidden_size=1408,
    use_qformer_text_input=False,
)
_TEXT_HIDDEN_SIZE_DEFAULT = 4096


def read_hf_config(config: Any, filename: str = "config.json") -> dict:
    """An HF config given as a path (the file, or a directory holding `filename`), dict or PretrainedConfig -> dict."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, filename)
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no {filename} at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ConfigError(f"expected a dict, a path to {filename} or a PretrainedConfig, got {type(config).__name__}")
    return config


def _sub_config(config: dict, name: str, default: dict) -> dict:
    sub = config.get(name)
    if sub is None:
        return default
    if hasattr(sub, "to_dict"):
        sub = sub.to_dict()
    if not isinstance(sub, dict):
        raise ConfigError(f"{name} must be a dict, got {type(sub).__name__}")
    return sub


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """The audio projector of `GraniteSpeech(Plus)ForConditionalGeneration` as a frozen, validated dataclass.

    A BLIP-2 Q-Former (`projector_config`, HF field names and defaults) whose `num_queries` learned
    queries cross-attend to each window of `window_size` encoder frames, then a linear map to the
    language model's width. `window_size` and `downsample_rate` are the full config's fields;
    `llm_hidden_size` is `text_config.hidden_size`; `encoder_hidden_size` is the encoder's output
    width (hidden_dim, or hidden_dim x (exports + 1) for plus).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    window_size: int = 15
    downsample_rate: int = 5
    llm_hidden_size: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "cross_attention_frequency",
            "encoder_hidden_size",
            "window_size",
            "downsample_rate",
            "llm_hidden_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"projector {name} must be a positive integer, got {value!r}")
        n = self.num_hidden_layers
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(
                f"projector num_hidden_layers must be at least 1, got {n!r}: layer 0 is the Q-Former's only "
                "guaranteed cross-attention, and without it the output ignores the audio"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"projector hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in PROJECTOR_ACTIVATIONS:
            raise ConfigError(
                f"projector hidden_act {self.hidden_act!r} is not supported (one of {', '.join(PROJECTOR_ACTIVATIONS)})"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ConfigError(f"projector layer_norm_eps must be a number in [0, 1), got {eps!r}")
        object.__setattr__(self, "layer_norm_eps", float(eps))
        if not isinstance(self.use_qformer_text_input, bool):
            raise ConfigError(f"use_qformer_text_input must be a bool, got {self.use_qformer_text_input!r}")
        if self.downsample_rate > self.window_size:
            raise ConfigError(
                f"downsample_rate ({self.downsample_rate}) exceeds window_size ({self.window_size}): "
                "num_queries = window_size // downsample_rate would be 0"
            )
        if self.window_size % self.downsample_rate:
            raise ConfigError(
                f"window_size ({self.window_size}) is not a multiple of downsample_rate ({self.downsample_rate}): "
                f"the reference reshapes the Q-Former output to nblocks * window_size // downsample_rate "
                f"rows, which is not nblocks * num_queries ({self.window_size // self.downsample_rate}) "
                "once there is more than one window (it fails, or scrambles the queries)"
            )

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def num_queries(self) -> int:
        """Learned queries per window: the projector's outputs per window_size encoder frames."""
        return self.window_size // self.downsample_rate

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer_idx: int) -> bool:
        """Whether Q-Former layer `layer_idx` (0-based) cross-attends to the encoder (HF: idx % freq == 0)."""
        return layer_idx % self.cross_attention_frequency == 0

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any) -> ProjectorConfig | None:
        """The projector of a full `GraniteSpeech(Plus)Config`; None for a bare encoder config.

        `config`: a path to `config.json` or a directory, a dict or a `PretrainedConfig`. Sub-configs a full
        config leaves out get transformers' defaults (Blip2QFormerConfig, GraniteConfig.hidden_size).
        """
        config = read_hf_config(config)
        model_type = config.get("model_type")
        if "projector_config" not in config and model_type not in _FULL_MODEL_TYPES:
            if model_type is None or model_type in _ENCODER_MODEL_TYPES:
                return None
            raise ConfigError(
                f"model_type {model_type!r} is not a Granite Speech model (expected one of "
                f"{_FULL_MODEL_TYPES + _ENCODER_MODEL_TYPES})"
            )
        proj = _sub_config(config, "projector_config", dict(_QFORMER_DEFAULTS))
        if proj.get("model_type", _QFORMER_MODEL_TYPE) != _QFORMER_MODEL_TYPE:
            raise ConfigError(
                f"projector_config has model_type {proj.get('model_type')!r}; only {_QFORMER_MODEL_TYPE!r} "
                "(the BLIP-2 Q-Former every Granite Speech release uses) is supported"
            )
        names = set(_QFORMER_DEFAULTS)
        kwargs = {k: v for k, v in proj.items() if k in names}
        text = _sub_config(config, "text_config", {})
        kwargs["llm_hidden_size"] = text.get("hidden_size", _TEXT_HIDDEN_SIZE_DEFAULT)
        for name in ("window_size", "downsample_rate"):
            if name in config:
                kwargs[name] = config[name]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a full HF config that define the projector (`from_hf_config` reads it back)."""
        d = dataclasses.asdict(self)
        top = {"window_size": d.pop("window_size"), "downsample_rate": d.pop("downsample_rate")}
        top["text_config"] = {"hidden_size": d.pop("llm_hidden_size")}
        d["model_type"] = _QFORMER_MODEL_TYPE
        top["projector_config"] = d
        return top
