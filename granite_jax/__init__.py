"""granite_jax: IBM's Granite Speech models in JAX / Flax NNX, exact against transformers."""

from granite_jax.audio import load_audio, resample
from granite_jax.buckets import BucketPolicy
from granite_jax.cache import enable_compilation_cache
from granite_jax.config import PRODUCTION, ConfigError, EncoderConfig, FeatureConfig, ProjectorConfig
from granite_jax.ctc import ctc_greedy_decode
from granite_jax.export import export_hf
from granite_jax.features import extract_features
from granite_jax.modeling import GraniteSpeechEncoder
from granite_jax.projector import GraniteSpeechProjector
from granite_jax.runner import EncodeResult, GraniteEncoder, Runner, load

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
    "Runner",
    "ctc_greedy_decode",
    "enable_compilation_cache",
    "export_hf",
    "extract_features",
    "load",
    "load_audio",
    "resample",
]
