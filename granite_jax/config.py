"""Every configuration in one place: frozen, validated dataclasses with Hugging Face's field names.

- `EncoderConfig`: `GraniteSpeechEncoderConfig` / `GraniteSpeechPlusEncoderConfig` (`config.json`).
- `ProjectorConfig`: the Q-Former projector of a full `GraniteSpeech(Plus)Config`.
- `FeatureConfig`: `GraniteSpeechFeatureExtractor`'s settings (`preprocessor_config.json`).

Each has `from_hf_config` (a path, a directory, a dict or a `PretrainedConfig`) and `to_hf_dict`; defaults
are written once, in the dataclass fields, and are transformers' own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from granite_jax.layers import ACTIVATIONS

# model_type values of configs that carry an `encoder_config` (and a projector) inside them.
FULL_MODEL_TYPES = ("granite_speech", "granite_speech_plus")
ENCODER_MODEL_TYPES = ("granite_speech_encoder", "granite_speech_plus_encoder")
QFORMER_MODEL_TYPE = "blip_2_qformer"
FEATURE_EXTRACTOR_TYPE = "GraniteSpeechFeatureExtractor"


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


def _sub_config(config: dict, name: str) -> dict:
    sub = config.get(name)
    if sub is None:
        return {}
    if hasattr(sub, "to_dict"):
        sub = sub.to_dict()
    if not isinstance(sub, dict):
        raise ConfigError(f"{name} must be a dict, got {type(sub).__name__}")
    return sub


def _known_fields(cls, config: dict, names: Iterable[str] | None = None) -> dict:
    """The entries of `config` that are fields of `cls` (or of `names`); None values mean "the default"."""
    names = set(names if names is not None else (f.name for f in dataclasses.fields(cls)))
    return {k: v for k, v in config.items() if k in names and v is not None}


def has_projector(config: dict) -> bool:
    """Whether an HF config dict describes a whole model with an audio projector (not a bare encoder)."""
    return "projector_config" in config or config.get("model_type") in FULL_MODEL_TYPES


# -- the encoder -------------------------------------------------------------------------------------------
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
        kwargs = _known_fields(cls, config)
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


# -- the projector -----------------------------------------------------------------------------------------
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
        proj = _sub_config(config, "projector_config")
        if proj.get("model_type", QFORMER_MODEL_TYPE) != QFORMER_MODEL_TYPE:
            raise ConfigError(
                f"projector_config has model_type {proj.get('model_type')!r}; only {QFORMER_MODEL_TYPE!r} "
                "(the BLIP-2 Q-Former every Granite Speech release uses) is supported"
            )
        kwargs = _known_fields(cls, proj, cls.qformer_fields())
        kwargs.update(_known_fields(cls, config, _TOP_LEVEL))
        llm = _sub_config(config, "text_config").get("hidden_size")
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


# -- the feature extractor ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """`GraniteSpeechFeatureExtractor`'s log-mel settings, with HF's names and defaults."""

    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80

    def __post_init__(self) -> None:
        check_positive_ints(self, self.hf_fields(), "FeatureConfig.")
        if self.n_fft < 2:
            raise ConfigError(f"FeatureConfig.n_fft must be at least 2, got {self.n_fft}")
        if self.win_length > self.n_fft:
            raise ConfigError(
                f"FeatureConfig.win_length ({self.win_length}) exceeds n_fft ({self.n_fft}): torch.stft needs "
                "the window to fit in the FFT"
            )

    @classmethod
    def hf_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def num_freqs(self) -> int:
        """Bins of the one-sided FFT."""
        return self.n_fft // 2 + 1

    @property
    def feature_dim(self) -> int:
        """Width of an encoder frame: two stacked mel frames (the encoder's `input_dim`)."""
        return 2 * self.n_mels

    @classmethod
    def from_hf_config(cls, config: Any) -> FeatureConfig:
        """Build from HF's `preprocessor_config.json` (a path, its directory, the dict, or the extractor).

        HF's extractor reads only the top-level fields (missing ones take the defaults) and ignores the saved
        `melspec_kwargs`; a file whose `melspec_kwargs` disagree with them is refused, since it then says two
        things (and transformers would silently use the top-level values).
        """
        if hasattr(config, "to_dict") and not isinstance(config, dict):
            config = config.to_dict()
        config = read_hf_config(config, "preprocessor_config.json")
        fe_type = config.get("feature_extractor_type")
        if fe_type is not None and fe_type != FEATURE_EXTRACTOR_TYPE:
            raise ConfigError(f"feature_extractor_type {fe_type!r} is not {FEATURE_EXTRACTOR_TYPE}")
        cfg = cls(**_known_fields(cls, config))
        saved = config.get("melspec_kwargs") or {}
        if not isinstance(saved, dict):
            raise ConfigError(f"melspec_kwargs must be a dict, got {type(saved).__name__}")
        for key, value in saved.items():
            field = "sampling_rate" if key == "sample_rate" else key
            if field in cls.hf_fields() and value != getattr(cfg, field):
                raise ConfigError(
                    f"melspec_kwargs[{key!r}] = {value!r} disagrees with {field} = {getattr(cfg, field)!r}, "
                    "which HF's extractor uses (it ignores melspec_kwargs): set the top-level field"
                )
        return cfg

    from_hf = from_hf_config  # the earlier name

    def to_hf_dict(self, projector: ProjectorConfig | None = None) -> dict[str, Any]:
        """`preprocessor_config.json` as transformers reads it back (top-level fields and melspec_kwargs).

        With `projector`, its window_size / downsample_rate go in as HF's `projector_*` fields.
        """
        d: dict[str, Any] = {"feature_extractor_type": FEATURE_EXTRACTOR_TYPE, **dataclasses.asdict(self)}
        d["melspec_kwargs"] = {
            ("sample_rate" if k == "sampling_rate" else k): v for k, v in d.items() if k in self.hf_fields()
        }
        if projector is not None:
            d["projector_window_size"] = projector.window_size
            d["projector_downsample_rate"] = projector.downsample_rate
        return d


# -- Granite Speech 5 (TurboCTC) ---------------------------------------------------------------------------
SPEECH5_CTC_MODEL_TYPE = "granite_speech5_ctc"
SPEECH5_ENCODER_MODEL_TYPE = "granite_speech5_encoder"
SPEECH5_FEATURE_EXTRACTOR_TYPE = "GraniteSpeech5FeatureExtractor"


def _rate(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {v!r}")
    object.__setattr__(obj, name, float(v))


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
            _rate(self, name)
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
            enc = _sub_config(config, "encoder_config")
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
        kwargs = _known_fields(cls, config)
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


@dataclasses.dataclass(frozen=True)
class Speech5FeatureConfig:
    """`GraniteSpeech5FeatureExtractor`'s settings, with HF's names and defaults."""

    num_mel_bins: int = 80
    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    delta_win_length: int = 3
    logmel_floor_db: float = 8.0

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            ("num_mel_bins", "sampling_rate", "n_fft", "win_length", "hop_length", "delta_win_length"),
            "Speech5FeatureConfig.",
        )
        if self.win_length > self.n_fft:
            raise ConfigError(f"Speech5FeatureConfig.win_length ({self.win_length}) exceeds n_fft ({self.n_fft})")
        if self.delta_win_length < 3:
            raise ConfigError(
                f"delta_win_length must be at least 3 (torchaudio's compute_deltas), got {self.delta_win_length}"
            )
        v = self.logmel_floor_db
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0:
            raise ConfigError(f"logmel_floor_db must be a positive number, got {v!r}")
        object.__setattr__(self, "logmel_floor_db", float(v))

    @property
    def n_mels(self) -> int:
        return self.num_mel_bins

    @property
    def num_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def feature_dim(self) -> int:
        return 4 * self.num_mel_bins

    def mel(self) -> FeatureConfig:
        """The mel spectrogram settings (shared with the 4.x front end)."""
        return FeatureConfig(self.sampling_rate, self.n_fft, self.win_length, self.hop_length, self.num_mel_bins)

    @classmethod
    def from_hf_config(cls, config: Any) -> Speech5FeatureConfig:
        if hasattr(config, "to_dict") and not isinstance(config, dict):
            config = config.to_dict()
        config = read_hf_config(config, "preprocessor_config.json")
        fe_type = config.get("feature_extractor_type")
        if fe_type is not None and fe_type != SPEECH5_FEATURE_EXTRACTOR_TYPE:
            raise ConfigError(f"feature_extractor_type {fe_type!r} is not {SPEECH5_FEATURE_EXTRACTOR_TYPE}")
        return cls(**_known_fields(cls, config))

    def to_hf_dict(self) -> dict[str, Any]:
        d = {"feature_extractor_type": SPEECH5_FEATURE_EXTRACTOR_TYPE, **dataclasses.asdict(self)}
        d.update(feature_size=self.feature_dim, padding_value=0.0, return_attention_mask=True)
        return d


def is_speech5(config: dict) -> bool:
    """Whether an HF config dict is a Granite Speech 5 model or encoder."""
    return config.get("model_type") in (SPEECH5_CTC_MODEL_TYPE, SPEECH5_ENCODER_MODEL_TYPE)
