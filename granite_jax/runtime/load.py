"""`granite_jax.load`: a granite_jax checkpoint (or an HF one, converted in memory) -> a Runner, every argument
checked before any weight is read, each block's weights read into arrays of their own (layerwise.py)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from granite_jax.checkpoint import store as checkpoint
from granite_jax.checkpoint.safetensors_file import SafetensorsFile
from granite_jax.convert.convert import convert_hf
from granite_jax.hf_config import read_hf_config
from granite_jax.models import speech5
from granite_jax.models.conformer import encoder_from_params
from granite_jax.models.granite import lm_from_params
from granite_jax.models.granite_lora import with_adapter
from granite_jax.models.projector import projector_from_params
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.runtime.buckets import BucketPolicy
from granite_jax.runtime.devices import DeviceSpec, resolve_devices
from granite_jax.runtime.generate import Language
from granite_jax.runtime.layerwise import BlockWeights
from granite_jax.runtime.runner import Runner, check_chunk_blocks
from granite_jax.text.prompt import PromptBuilder
from granite_jax.text.tokenizer import CTCTokenizer


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return d


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    buckets: str | Sequence[int] | BucketPolicy = "auto",
    chunk_blocks: int | None = 8,
    devices: DeviceSpec = None,
) -> Runner:
    """Load an encoder (and its projector) from a granite-jax-convert directory, or convert an HF one in memory.

    `path`: a granite_jax checkpoint, an HF checkpoint directory, or a hub id (downloaded if online).
    `dtype`: parameter and compute dtype ("float32" default); stored parameters are cast to it.
    `buckets`: padded-length policy, see `BucketPolicy`. `chunk_blocks`: each layer works through the
    batch in tiles of about this many blocks' frames (8 x 200 = 1600 by default): cache-sized intermediates
    (faster on CPU) and memory that grows only with the hidden states, however long the audio or large the
    batch. None never tiles (one pass over the whole batch: more memory, slower on CPU).
    `devices`: see `Runner`. Every argument is checked before any weight is read.
    """
    param_dtype = _float_dtype(dtype)
    devices = resolve_devices(devices)
    BucketPolicy.make(buckets)
    check_chunk_blocks(chunk_blocks)
    path = os.fspath(path)
    loaded = checkpoint.load(path) if checkpoint.is_checkpoint(path) else convert_hf(path)
    # Converted in memory: hand each array over and drop it, so the weights are held once.
    consume = isinstance(loaded.params, dict)
    build = speech5.encoder_from_params if isinstance(loaded.config, Speech5Config) else encoder_from_params
    parts: dict = {}  # each block's weights as arrays of their own, for the layerwise runner
    model = build(
        loaded.config, loaded.params, param_dtype=param_dtype, dtype=param_dtype, consume=consume, unstacked=parts
    )
    speech5_model = isinstance(loaded.config, Speech5Config)
    tokenizer = None
    if speech5_model and "tokenizer.json" in loaded.files:
        tokenizer = CTCTokenizer.from_dir(os.path.dirname(loaded.files["tokenizer.json"]), loaded.config.pad_token_id)
    projector = None
    if loaded.projector_config is not None:
        projector = projector_from_params(
            loaded.projector_config, loaded.projector_params, param_dtype=param_dtype, dtype=param_dtype
        )
    language = None
    if loaded.language_config is not None:
        language = language_model(loaded, param_dtype)
    return Runner(
        model,
        language=language,
        files=loaded.files,
        projector=projector,
        feature_config=loaded.feature_config,
        tokenizer=tokenizer,
        buckets=buckets,
        chunk_blocks=chunk_blocks,
        provenance=loaded.provenance,
        devices=devices,
        layerwise=BlockWeights(model, parts) if parts else False,
    )


def language_model(loaded, param_dtype) -> Language:
    """The language model of a loaded whole 4.x checkpoint, with its prompt builder and generation settings."""
    lang = loaded.language_config
    lm = lm_from_params(lang.text, loaded.language_params, param_dtype=param_dtype, dtype=param_dtype)
    if lang.has_lora_adapter:
        lm = with_adapter(lm, loaded.files, lang)
    prompts = None  # read when first needed (a broken tokenizer does not stop encoding or export)
    if "tokenizer.json" in loaded.files:
        prompts = functools.partial(
            PromptBuilder.from_dir, os.path.dirname(loaded.files["tokenizer.json"]), lang.audio_token_id
        )
    generation = None
    if "generation_config.json" in loaded.files:
        generation = read_hf_config(loaded.files["generation_config.json"], "generation_config.json")
    bpe_head = None
    if "out_llm.safetensors" in loaded.files:  # 4.1's BPE CTC head: the speculative draft
        head = SafetensorsFile(loaded.files["out_llm.safetensors"])
        if set(head) != {"weight", "bias"}:
            raise ValueError(f"{head.path} must hold a Linear's weight and bias, got {sorted(head)}")
        bpe_head = (head.get_tensor("weight").astype(np.float32), head.get_tensor("bias").astype(np.float32))
    return Language(lm, lang, prompts, generation, bpe_head)
