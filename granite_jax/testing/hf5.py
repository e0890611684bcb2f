"""The torch reference for Granite Speech 5: `GraniteSpeech5ForCTC` checkpoints made on the spot with
transformers (every parameter and buffer perturbed), their feature extractor, and CTC tokenizers trained here
with `tokenizers` in the two kinds the releases use: GPT-2-style byte-level BPE and SentencePiece-style BPE
with byte fallback. Needs torch and transformers, imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from granite_jax.frontend.config import Speech5FeatureConfig
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.testing.hf import perturb_, require_torch

# A small config exercising every code path; tests derive variants with dataclasses.replace.
TINY5 = Speech5Config(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_mel_bins=8,
    context_size=8,
    max_position_embeddings=10,
    conv_kernel_size=7,
    subsample_layers=(0, 1),
)
TINY5_FEATURES = Speech5FeatureConfig(num_mel_bins=8)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "flight two three seven leaves gate eighteen",
    "please send the quarterly report to maria",
    "naïve café façade über straße",  # bytes beyond ASCII
    "hello world, how are you today?",
]


def hf5_config(cfg: Speech5Config):
    """transformers' GraniteSpeech5CTCConfig for `cfg`."""
    _, tf = require_torch()
    d = cfg.to_hf_dict()
    d.pop("model_type")
    d.pop("architectures")
    return tf.GraniteSpeech5CTCConfig(**d)


def hf5_model(cfg: Speech5Config, *, seed: int = 0):
    """A perturbed `GraniteSpeech5ForCTC` in eval mode (ctc_head tied to encoder.out unless untied)."""
    torch, tf = require_torch()
    torch.manual_seed(seed)
    model = tf.GraniteSpeech5ForCTC(hf5_config(cfg)).eval()
    perturb_(model, seed=seed)
    return model


def make_hf5_checkpoint(
    cfg: Speech5Config,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer: Any = None,
    features: Speech5FeatureConfig | None = None,
):
    """Save a perturbed GraniteSpeech5ForCTC (+ its feature extractor, + `tokenizer` as a ParakeetTokenizer)
    at `path`; return the fp32 model it holds (the stored, rounded weights)."""
    torch, tf = require_torch()
    model = hf5_model(cfg, seed=seed).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(os.fspath(path), **kwargs)
    feats = features or Speech5FeatureConfig(num_mel_bins=cfg.num_mel_bins)
    d = feats.to_hf_dict()
    for key in ("feature_extractor_type", "feature_size", "return_attention_mask"):
        d.pop(key)
    tf.GraniteSpeech5FeatureExtractor(**d).save_pretrained(os.fspath(path))
    if tokenizer is not None:
        hf_tokenizer(tokenizer).save_pretrained(os.fspath(path))
    return model.float().eval()


def train_tokenizer(kind: str, vocab_size: int, texts: Sequence[str] = TEXTS):
    """A small CTC tokenizer (`tokenizers.Tokenizer`) with "<pad>" (id 0, the blank) and "<unk>":
    `kind` "byte_level" (GPT-2 style, Ġ marks a word start) or "sentencepiece" (▁ marks it, byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special = ["<pad>", "<unk>"]
    corpus = list(texts) * 20
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        bytes_ = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + bytes_)
    else:
        raise ValueError(f"kind must be 'byte_level' or 'sentencepiece', got {kind!r}")
    tok.train_from_iterator(corpus, trainer)
    return tok


def hf_tokenizer(tokenizer):
    """transformers' ParakeetTokenizer around a `tokenizers.Tokenizer` (its CTC decode: group, drop blank)."""
    _, tf = require_torch()
    return tf.ParakeetTokenizer(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")


def hf5_generate(model: Any, features: Any, attention_mask: Any = None):
    """`model.generate(...)`: greedy CTC ids, padded positions set to the blank (as numpy)."""
    torch, _ = require_torch()
    import numpy as np

    with torch.no_grad():
        x = torch.as_tensor(np.asarray(features, np.float32))
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model.generate(input_features=x, attention_mask=mask).numpy()
