"""granite_jax: IBM's Granite Speech models in JAX / Flax NNX, exact against transformers."""

from granite_jax.checkpoint.export import export_hf
from granite_jax.frontend.audio import load_audio, resample
from granite_jax.frontend.config import FeatureConfig
from granite_jax.frontend.features import extract_features
from granite_jax.hf_config import ConfigError
from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.models.conformer_config import PRODUCTION, EncoderConfig
from granite_jax.models.projector import GraniteSpeechProjector
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.runtime.buckets import BucketPolicy
from granite_jax.runtime.cache import enable_compilation_cache
from granite_jax.runtime.load import load
from granite_jax.runtime.results import EncodeResult
from granite_jax.runtime.runner import GraniteEncoder, Runner
from granite_jax.text.ctc import ctc_greedy_decode

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
