"""HF -> granite_jax checkpoint conversion (installed as `granite_jax.convert`).

`key_map` holds the table from HF encoder keys to NNX parameter paths; `sources` reads HF checkpoints
lazily; `cli` is the `granite-jax-convert` entry point.
"""

CONVERTER_VERSION = "1"

from granite_jax.convert.convert import convert_checkpoint, convert_hf
from granite_jax.convert.key_map import ConversionError, flax_to_hf, hf_to_flax
from granite_jax.convert.sources import HFCheckpoint, open_hf_checkpoint

__all__ = [
    "CONVERTER_VERSION",
    "ConversionError",
    "convert_checkpoint",
    "convert_hf",
    "HFCheckpoint",
    "flax_to_hf",
    "hf_to_flax",
    "open_hf_checkpoint",
]
