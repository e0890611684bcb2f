"""granite_jax: IBM's Granite Speech conformer encoder in JAX / Flax NNX, exact against transformers."""

from granite_jax.api import BucketPolicy, EncodeResult, GraniteEncoder, ctc_greedy_decode, load
from granite_jax.audio import load_audio, resample
from granite_jax.cache import enable_compilation_cache
from granite_jax.config import PRODUCTION, ConfigError, EncoderConfig, ProjectorConfig
from granite_jax.features import FeatureConfig, extract_features
from granite_jax.modeling import GraniteSpeechEncoder
from granite_jax.projector import GraniteSpeechProjector

__version__ = "0.1.0"

__all__ = [
    "PRODUCTION",
    "BucketPolicy",
    "ConfigError",
    "EncodeResult",
    "EncoderConfig",
    "FeatureConfig",
    "GraniteEncoder",
    "GraniteSpeechEncoder",
    "GraniteSpeechProjector",
    "ProjectorConfig",
    "ctc_greedy_decode",
    "enable_compilation_cache",
    "extract_features",
    "load",
    "load_audio",
    "resample",
]
