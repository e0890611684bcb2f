"""`EncoderConfig`: the 4.x conformer encoder's configuration (`GraniteSpeechEncoderConfig` /
`GraniteSpeechPlusEncoderConfig`, `config.json`), and `PRODUCTION`, the released 4.1-2b encoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from granite_jax.hf_config import (
    ENCODER_MODEL_TYPES,
    FULL_MODEL_TYPES,
    ConfigError,
    check_positive_ints,
    known_fields,
    read_hf_config,
)


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
        check_positive_ints(
            self,
            ("input_dim", "num_layers", "hidden_dim", "feedforward_mult", "num_heads", "output_dim")
            + ("context_size", "max_pos_emb", "conv_kernel_size", "conv_expansion_factor"),
            allow_zero=("num_layers",),
        )
        if self.dim_head is None:
            if self.hidden_dim // self.num_heads <= 0:
                raise ConfigError(
                    f"hidden_dim // num_heads is {self.hidden_dim // self.num_heads}; set dim_head explicitly"
                )
            object.__setattr__(self, "dim_head", self.hidden_dim // self.num_heads)
        check_positive_ints(self, ("dim_head",))
        if self.context_size > self.max_pos_emb:
            raise ConfigError(
                f"context_size ({self.context_size}) exceeds max_pos_emb ({self.max_pos_emb}): the relative "
                "position table cannot cover a block"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        object.__setattr__(self, "dropout", float(dropout))
        if self.cat_hidden_layers is not None:
            if isinstance(self.cat_hidden_layers, (str, bytes)) or not isinstance(self.cat_hidden_layers, Iterable):
                raise ConfigError(f"cat_hidden_layers must be a list of layer indices, got {self.cat_hidden_layers!r}")
            layers = tuple(self.cat_hidden_layers)
            for idx in layers:
                if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= idx <= self.num_layers:
                    raise ConfigError(
                        f"cat_hidden_layers entry {idx!r} is out of range [0, {self.num_layers}] "
                        "(0 is the input projection, i the output of block i)"
                    )
            object.__setattr__(self, "cat_hidden_layers", tuple(int(i) for i in layers))

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

    @property
    def blank_id(self) -> int:
        """The CTC blank: id 0 of the character heads."""
        return 0

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any) -> EncoderConfig:
        """Build from an HF config: a path to `config.json` or a directory, a dict, or a `PretrainedConfig`.

        Accepts a bare encoder config or a full `GraniteSpeech(Plus)Config` (its `encoder_config`).
        """
        config = read_hf_config(config)
        model_type = config.get("model_type")
        if "encoder_config" in config or model_type in FULL_MODEL_TYPES:
            enc = config.get("encoder_config")
            if hasattr(enc, "to_dict"):
                enc = enc.to_dict()
            if not isinstance(enc, dict):
                raise ConfigError(f"config of model_type {model_type!r} has no encoder_config")
            config = enc
            model_type = config.get("model_type")
        if model_type is not None and model_type not in ENCODER_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Granite Speech encoder (expected one of "
                f"{ENCODER_MODEL_TYPES + FULL_MODEL_TYPES})"
            )
        kwargs = known_fields(cls, config)
        if config.get("cat_hidden_layers") is not None:
            kwargs["cat_hidden_layers"] = config["cat_hidden_layers"]
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong kind that the checks above could not reach
            raise ConfigError(f"encoder config: {e}") from None

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
