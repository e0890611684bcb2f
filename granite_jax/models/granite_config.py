"""`GraniteConfig`: the Granite language model of the 4.x speech models (`text_config` of a
`GraniteSpeechConfig`, transformers' `GraniteConfig`), and `LanguageConfig`, what the speech model adds
around it (the audio token, whether a q/v LoRA adapter comes with it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from granite_jax.hf_config import FULL_MODEL_TYPES, ConfigError, check_positive_ints, known_fields, read_hf_config
from granite_jax.models.layers import ACTIVATIONS

GRANITE_MODEL_TYPE = "granite"
ROPE_TYPES = ("default",)  # rope_parameters["rope_type"] values implemented here


def _number(obj: Any, name: str, *, positive: bool = False) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"GraniteConfig.{name} must be a {'positive ' if positive else ''}finite number, got {v!r}")
    object.__setattr__(obj, name, float(v))


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"GraniteConfig.{name} must be a token id or a list of them, got {value!r}")
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class GraniteConfig:
    """transformers' `GraniteConfig` as a frozen, validated dataclass (HF field names and defaults).

    `rope_theta` is read from `rope_parameters` (transformers 5) or the older top-level `rope_theta`; a RoPE
    type other than "default" is refused. `head_dim` defaults to hidden_size // num_attention_heads.
    `eos_token_id` is a tuple (HF allows one id or a list).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        check_positive_ints(self, names + ("max_position_embeddings",), "GraniteConfig.")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        check_positive_ints(self, ("num_key_value_heads", "head_dim"), "GraniteConfig.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"GraniteConfig.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"GraniteConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"GraniteConfig.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta", "logits_scaling"):
            _number(self, name, positive=True)
        for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
            _number(self, name)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"GraniteConfig.{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id, "eos_token_id"))
        for name in ("pad_token_id", "bos_token_id"):
            ids = _token_ids(getattr(self, name), name)
            if len(ids) > 1:
                raise ConfigError(f"GraniteConfig.{name} must be one token id, got {getattr(self, name)!r}")
            object.__setattr__(self, name, ids[0] if ids else None)
        bad = [i for i in (*self.eos_token_id, self.pad_token_id, self.bos_token_id) if i is not None]
        if any(i >= self.vocab_size for i in bad):
            raise ConfigError(f"GraniteConfig: token ids {bad} must lie below vocab_size {self.vocab_size}")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> GraniteConfig:
        """From a `GraniteConfig` (a path, a directory, a dict or a PretrainedConfig) or a whole speech model's
        config (its `text_config`)."""
        config = read_hf_config(config)
        if "text_config" in config:
            config = config["text_config"] or {}
            if hasattr(config, "to_dict"):
                config = config.to_dict()
        if config.get("model_type", GRANITE_MODEL_TYPE) != GRANITE_MODEL_TYPE:
            raise ConfigError(
                f"text_config.model_type {config.get('model_type')!r} is not {GRANITE_MODEL_TYPE!r} (the dense Granite "
                "language model; other architectures are not implemented)"
            )
        kwargs = known_fields(cls, config)
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            rope = scaling
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(
                    f"RoPE type {kind!r} (rope_parameters / rope_scaling) is not implemented; implemented: {ROPE_TYPES}"
                )
            if rope.get("rope_theta") is not None:
                kwargs["rope_theta"] = rope["rope_theta"]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"GraniteConfig: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' `GraniteConfig` dict (the `text_config` of a speech model)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        d["model_type"] = GRANITE_MODEL_TYPE
        return d


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """The speech model's language side: its `GraniteConfig`, the audio placeholder's id, and whether a q/v LoRA
    adapter (`has_lora_adapter`, 3.x) belongs to it."""

    text: GraniteConfig
    audio_token_id: int = 49155
    has_lora_adapter: bool = False

    def __post_init__(self) -> None:
        # any id: transformers never embeds it (the audio embeddings replace those positions); the tokenizer
        # must give the audio token this id (checked when prompts are built)
        check_positive_ints(self, ("audio_token_id",), "LanguageConfig.", allow_zero=("audio_token_id",))

    @classmethod
    def from_hf_config(cls, config: Any) -> LanguageConfig | None:
        """From a whole `GraniteSpeech(Plus)Config`; None for a config without a language model."""
        config = read_hf_config(config)
        if config.get("model_type") not in FULL_MODEL_TYPES or not config.get("text_config"):
            return None
        audio = config.get("audio_token_id", config.get("audio_token_index", cls.audio_token_id))
        return cls(GraniteConfig.from_hf_config(config), audio, bool(config.get("has_lora_adapter", True)))

    @classmethod
    def from_granite_jax(cls, config: dict) -> LanguageConfig:
        """From what `to_hf_dict` wrote (a granite_jax checkpoint's language_config.json)."""
        if not isinstance(config.get("text_config"), dict):
            raise ConfigError("language_config.json has no text_config")
        try:
            return cls(
                GraniteConfig.from_hf_config(config["text_config"]),
                config.get("audio_token_index", cls.audio_token_id),
                bool(config.get("has_lora_adapter", False)),
            )
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a whole speech config that describe the language side."""
        return {
            "text_config": self.text.to_hf_dict(),
            "audio_token_index": self.audio_token_id,
            "has_lora_adapter": self.has_lora_adapter,
        }
