"""granite_jax: IBM's Granite Speech conformer encoder in JAX / Flax NNX, exact against transformers."""

from granite_jax.api import BucketPolicy, GraniteEncoder, load
from granite_jax.config import PRODUCTION, ConfigError, EncoderConfig
from granite_jax.modeling import GraniteSpeechEncoder

__version__ = "0.1.0"

__all__ = [
    "PRODUCTION",
    "BucketPolicy",
    "ConfigError",
    "EncoderConfig",
    "GraniteEncoder",
    "GraniteSpeechEncoder",
    "load",
]
