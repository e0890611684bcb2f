"""HF -> granite_jax checkpoint conversion (installed as `granite_jax.convert`).

`key_map` holds the tables from HF encoder and projector keys to NNX parameter paths; `sources` reads
HF checkpoints lazily; `cli` is the `granite-jax-convert` entry point.
"""

CONVERTER_VERSION = "2"  # 2: full checkpoints also convert the projector

from granite_jax.convert.convert import convert_checkpoint, convert_hf
from granite_jax.convert.key_map import ENCODER_KEYS, PROJECTOR_KEYS, ConversionError, flax_to_hf, hf_to_flax
from granite_jax.convert.sources import HFCheckpoint, open_hf_checkpoint

from granite_jax.checkpoint import Converted

__all__ = [
    "CONVERTER_VERSION",
    "ENCODER_KEYS",
    "PROJECTOR_KEYS",
    "ConversionError",
    "Converted",
    "convert_checkpoint",
    "convert_hf",
    "HFCheckpoint",
    "flax_to_hf",
    "hf_to_flax",
    "open_hf_checkpoint",
]
