"""`Speech5Config`: Granite Speech 5 (TurboCTC)'s encoder and CTC head (`GraniteSpeech5CTCConfig`), and
`SPEECH5_PRODUCTION`, the released granite-speech-5.0-470m-turboctc."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from granite_jax.hf_config import (
    SPEECH5_CTC_MODEL_TYPE,
    SPEECH5_ENCODER_MODEL_TYPE,
    ConfigError,
    check_positive_ints,
    check_rate,
    known_fields,
    read_hf_config,
    sub_config,
)
from granite_jax.models.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class Speech5Config:
    """`GraniteSpeech5EncoderConfig` (with the CTC head's `pad_token_id` and `tie_word_embeddings` of a
    `GraniteSpeech5CTCConfig`) as a frozen, validated dataclass with HF's field names and defaults.

    `subsample_layers`: the blocks that halve time (stride-2 depthwise conv, mean-pooled residual).
    `pad_token_id` is the CTC blank. With `tie_word_embeddings` the CTC head is the encoder's `out`.
    """

    vocab_size: int = 16384
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    num_mel_bins: int = 80
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    context_size: int = 128
    conv_kernel_size: int = 7
    conv_expansion_factor: int = 2
    subsample_layers: tuple[int, ...] | None = None
    attention_bias: bool = True
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_mel_bins")
            + ("max_position_embeddings", "context_size", "conv_kernel_size", "conv_expansion_factor"),
            allow_zero=(),
        )
        check_positive_ints(self, ("num_hidden_layers",), allow_zero=("num_hidden_layers",))
        if self.head_dim is None:
            if self.hidden_size // self.num_attention_heads <= 0:
                raise ConfigError("hidden_size // num_attention_heads is 0; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        check_positive_ints(self, ("head_dim",))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        check_positive_ints(self, ("num_key_value_heads",))
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) differs from num_attention_heads "
                f"({self.num_attention_heads}): GraniteSpeech5's k_proj and v_proj already project to every head, "
                "and transformers itself fails on such a config (grouped keys and values are not supported)"
            )
        if self.context_size > self.max_position_embeddings:
            raise ConfigError(
                f"context_size ({self.context_size}) exceeds max_position_embeddings ({self.max_position_embeddings})"
            )
        if self.conv_kernel_size % 2 == 0:
            raise ConfigError(
                f"conv_kernel_size must be odd, got {self.conv_kernel_size}: the conv's (k - 1) // 2 padding keeps "
                "the length only for odd kernels, and transformers fails on even ones"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (one of {', '.join(ACTIVATIONS)})")
        for name in ("attention_dropout", "activation_dropout"):
            check_rate(self, name)
        for name in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        layers = (0, 1) if self.subsample_layers is None else self.subsample_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ConfigError(f"subsample_layers must be a list of block indices, got {layers!r}")
        layers = tuple(layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_hidden_layers:
                raise ConfigError(f"subsample_layers entry {i!r} is out of range [0, {self.num_hidden_layers})")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"subsample_layers has repeated entries: {list(layers)}")
        object.__setattr__(self, "subsample_layers", tuple(sorted(int(i) for i in layers)))
        pad = self.pad_token_id
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < self.vocab_size:
            raise ConfigError(f"pad_token_id (the CTC blank) must be an id in [0, {self.vocab_size}), got {pad!r}")
        object.__setattr__(self, "pad_token_id", int(pad))

    # -- derived quantities (the names the runner shares with EncoderConfig) -------------------------
    @property
    def input_dim(self) -> int:
        """Features per encoder frame: mel bins and their deltas, two frames stacked."""
        return 4 * self.num_mel_bins

    @property
    def output_dim(self) -> int:
        """The CTC head's width (the vocabulary)."""
        return self.vocab_size

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @property
    def output_width(self) -> int:
        return self.hidden_size

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim  # type: ignore[operator]

    @property
    def self_conditioning_layer(self) -> int:
        """1-based block after which CTC self-conditioning runs; 0 means never."""
        return self.num_hidden_layers // 2

    @property
    def blank_id(self) -> int:
        """The CTC blank: the pad token."""
        return self.pad_token_id

    @property
    def subsampling(self) -> int:
        """How many input frames make one output frame."""
        return 2 ** len(self.subsample_layers)

    def output_frames(self, frames):
        """Output frames for `frames` input frames (int or array): halved (rounded down) per subsampling block."""
        for _ in self.subsample_layers:
            frames = frames // 2
        return frames

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any) -> Speech5Config:
        """From a `GraniteSpeech5CTCConfig` (its `encoder_config` and CTC fields) or a bare
        `GraniteSpeech5EncoderConfig`: a path to `config.json` or its directory, a dict or a PretrainedConfig."""
        config = read_hf_config(config)
        model_type = config.get("model_type")
        top = {}
        if model_type == SPEECH5_CTC_MODEL_TYPE or "encoder_config" in config:
            enc = sub_config(config, "encoder_config")
            top = {k: config[k] for k in ("pad_token_id", "tie_word_embeddings") if config.get(k) is not None}
            if (
                config.get("vocab_size") is not None
                and enc.get("vocab_size", config["vocab_size"]) != config["vocab_size"]
            ):
                raise ConfigError(
                    f"the CTC config's vocab_size ({config['vocab_size']}) differs from its encoder's "
                    f"({enc.get('vocab_size')})"
                )
            config, model_type = enc, enc.get("model_type")
        if model_type is not None and model_type != SPEECH5_ENCODER_MODEL_TYPE:
            raise ConfigError(f"model_type {model_type!r} is not a Granite Speech 5 encoder")
        kwargs = known_fields(cls, config)
        kwargs.update(top)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"Granite Speech 5 config: {e}") from None

    def encoder_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("pad_token_id", "tie_word_embeddings"):
            d.pop(k)
        d["subsample_layers"] = list(self.subsample_layers)
        d["model_type"] = SPEECH5_ENCODER_MODEL_TYPE
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The `GraniteSpeech5CTCConfig` dict (`config.json` of a `GraniteSpeech5ForCTC`)."""
        return {
            "model_type": SPEECH5_CTC_MODEL_TYPE,
            "architectures": ["GraniteSpeech5ForCTC"],
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "ctc_loss_reduction": "mean",
            "ctc_zero_infinity": True,
            "encoder_config": self.encoder_dict(),
        }


# The released granite-speech-5.0-470m-turboctc (transformers' defaults).
SPEECH5_PRODUCTION = Speech5Config()
