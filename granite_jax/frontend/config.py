"""The front ends' settings: `FeatureConfig` (`GraniteSpeechFeatureExtractor`, 4.x) and
`Speech5FeatureConfig` (`GraniteSpeech5FeatureExtractor`), as `preprocessor_config.json` holds them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from granite_jax.hf_config import ConfigError, check_positive_ints, known_fields, read_hf_config

if TYPE_CHECKING:
    from granite_jax.models.projector_config import ProjectorConfig

FEATURE_EXTRACTOR_TYPE = "GraniteSpeechFeatureExtractor"
SPEECH5_FEATURE_EXTRACTOR_TYPE = "GraniteSpeech5FeatureExtractor"


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
        cfg = cls(**known_fields(cls, config))
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
        return cls(**known_fields(cls, config))

    def to_hf_dict(self) -> dict[str, Any]:
        d = {"feature_extractor_type": SPEECH5_FEATURE_EXTRACTOR_TYPE, **dataclasses.asdict(self)}
        d.update(feature_size=self.feature_dim, padding_value=0.0, return_attention_mask=True)
        return d
