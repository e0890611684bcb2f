"""HF -> granite_jax checkpoint conversion (installed as `granite_jax.convert`).

`key_map` holds the tables from HF encoder and projector keys to NNX parameter paths; `sources` reads
HF checkpoints lazily; `convert` converts; `cli` is the `granite-jax-convert` entry point.
"""

from granite_jax.checkpoint.store import Converted
from granite_jax.convert.convert import CONVERTER_VERSION, convert_checkpoint, convert_hf
from granite_jax.convert.key_map import ENCODER_KEYS, PROJECTOR_KEYS, ConversionError, flax_to_hf, hf_to_flax
from granite_jax.convert.sources import HFCheckpoint, open_hf_checkpoint

__all__ = [
    "CONVERTER_VERSION",
    "ENCODER_KEYS",
    "PROJECTOR_KEYS",
    "ConversionError",
    "Converted",
    "HFCheckpoint",
    "convert_checkpoint",
    "convert_hf",
    "flax_to_hf",
    "hf_to_flax",
    "open_hf_checkpoint",
]
