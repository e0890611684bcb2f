"""`ProjectorConfig`: the Q-Former audio projector of a full `GraniteSpeech(Plus)Config`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from granite_jax.hf_config import (
    ENCODER_MODEL_TYPES,
    FULL_MODEL_TYPES,
    QFORMER_MODEL_TYPE,
    ConfigError,
    check_positive_ints,
    has_projector,
    known_fields,
    read_hf_config,
    sub_config,
)
from granite_jax.models.layers import ACTIVATIONS

# The fields of ProjectorConfig that live in the full config's `projector_config` (the rest are top-level
# window_size / downsample_rate and text_config.hidden_size).
_TOP_LEVEL = ("window_size", "downsample_rate")
_LLM = "llm_hidden_size"
PROJECTOR_ACTIVATIONS = tuple(ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """The audio projector of `GraniteSpeech(Plus)ForConditionalGeneration` as a frozen, validated dataclass.

    A BLIP-2 Q-Former (`projector_config`, HF field names and `Blip2QFormerConfig`'s defaults) whose
    `num_queries` learned queries cross-attend to each window of `window_size` encoder frames, then a linear
    map to the language model's width. `window_size` and `downsample_rate` are the full config's fields;
    `llm_hidden_size` is `text_config.hidden_size` (GraniteConfig's default 4096); `encoder_hidden_size` is
    the encoder's output width (hidden_dim, or hidden_dim x (exports + 1) for plus).
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
        check_positive_ints(
            self,
            ("hidden_size", "num_attention_heads", "intermediate_size", "cross_attention_frequency")
            + ("encoder_hidden_size", "window_size", "downsample_rate", "llm_hidden_size"),
            "projector ",
        )
        n = self.num_hidden_layers
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(
                f"projector num_hidden_layers must be at least 1, got {n!r}: layer 0 is the Q-Former's only "
                "guaranteed cross-attention, and without it the output ignores the audio"
            )
        object.__setattr__(self, "num_hidden_layers", int(n))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"projector hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"projector hidden_act {self.hidden_act!r} is not supported (one of {', '.join(ACTIVATIONS)})"
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

    @classmethod
    def qformer_fields(cls) -> tuple[str, ...]:
        """The fields that live in the full config's `projector_config` (a Blip2QFormerConfig)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _TOP_LEVEL + (_LLM,))

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any) -> ProjectorConfig | None:
        """The projector of a full `GraniteSpeech(Plus)Config`; None for a bare encoder config.

        `config`: a path to `config.json` or a directory, a dict or a `PretrainedConfig`. Sub-configs a full
        config leaves out get transformers' defaults (Blip2QFormerConfig, GraniteConfig.hidden_size).
        """
        config = read_hf_config(config)
        model_type = config.get("model_type")
        if not has_projector(config):
            if model_type is None or model_type in ENCODER_MODEL_TYPES:
                return None
            raise ConfigError(
                f"model_type {model_type!r} is not a Granite Speech model (expected one of "
                f"{FULL_MODEL_TYPES + ENCODER_MODEL_TYPES})"
            )
        proj = sub_config(config, "projector_config")
        if proj.get("model_type", QFORMER_MODEL_TYPE) != QFORMER_MODEL_TYPE:
            raise ConfigError(
                f"projector_config has model_type {proj.get('model_type')!r}; only {QFORMER_MODEL_TYPE!r} "
                "(the BLIP-2 Q-Former every Granite Speech release uses) is supported"
            )
        kwargs = known_fields(cls, proj, cls.qformer_fields())
        kwargs.update(known_fields(cls, config, _TOP_LEVEL))
        llm = sub_config(config, "text_config").get("hidden_size")
        if llm is not None:
            kwargs[_LLM] = llm
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"projector config: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a full HF config that define the projector (`from_hf_config` reads it back)."""
        d = dataclasses.asdict(self)
        top = {k: d.pop(k) for k in _TOP_LEVEL}
        top["text_config"] = {"hidden_size": d.pop(_LLM)}
        d["model_type"] = QFORMER_MODEL_TYPE
        top["projector_config"] = d
        return top
