"""Reference HF checkpoints made on the spot with transformers (random, fully perturbed weights).

Used by the tests, `granite-jax demo` and the benchmarks. Needs torch and transformers
(`pip install granite-jax[torch]`); imported lazily so the runtime library never needs torch.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

from granite_jax.config import EncoderConfig


def _require_torch():
    """(torch, transformers), imported on first use so that the library itself never needs them."""
    try:
        return importlib.import_module("torch"), importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(
            f"this needs the PyTorch reference ({e.name} is missing): pip install 'granite-jax[torch]'"
        ) from None


def hf_encoder_config(cfg: EncoderConfig):
    """The transformers encoder config (plus variant when cat_hidden_layers is set)."""
    _, tf = _require_torch()
    d = cfg.to_hf_dict()
    d.pop("model_type")
    cls = tf.GraniteSpeechPlusEncoderConfig if cfg.is_plus else tf.GraniteSpeechEncoderConfig
    return cls(**d)


def hf_encoder(cfg: EncoderConfig, *, seed: int = 0):
    """A transformers `GraniteSpeech(Plus)CTCEncoder` in eval mode with every parameter and buffer perturbed."""
    torch, tf = _require_torch()
    torch.manual_seed(seed)
    cls = tf.GraniteSpeechPlusCTCEncoder if cfg.is_plus else tf.GraniteSpeechCTCEncoder
    model = cls(hf_encoder_config(cfg)).eval()
    perturb_(model, seed=seed)
    return model


def perturb_(module: Any, *, seed: int = 0, scale: float = 0.3) -> None:
    """Overwrite every parameter and buffer with random values, so that no default init hides a bug.

    Matrices get N(0, 1/fan_in); 1-D weights (LayerNorm, BatchNorm gains) 1 + N(0, scale); biases and
    running means N(0, scale); running variances U(0.5, 2); BatchNorm counters a random integer.
    Non-persistent buffers (the reference's precomputed attention_dists) are left alone.
    """
    torch, _ = _require_torch()
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    persistent = set(module.state_dict().keys())
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(randn(p.shape) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + scale * randn(p.shape))
            else:
                p.copy_(scale * randn(p.shape))
        for name, b in module.named_buffers():
            if name not in persistent:
                continue
            if name.endswith("running_mean"):
                b.copy_(scale * randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
            elif b.is_floating_point():
                b.copy_(scale * randn(b.shape))


def _full_model(cfg: EncoderConfig, *, seed: int):
    """A tiny GraniteSpeech(Plus)ForConditionalGeneration around an encoder of `cfg`."""
    torch, tf = _require_torch()
    torch.manual_seed(seed)
    n_cat = len(cfg.exported_layers)
    text = dict(
        model_type="granite",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    projector = dict(
        model_type="blip_2_qformer",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=cfg.hidden_dim * (n_cat + 1),
    )
    enc = cfg.to_hf_dict()
    cls_cfg = tf.GraniteSpeechPlusConfig if cfg.is_plus else tf.GraniteSpeechConfig
    cls = tf.GraniteSpeechPlusForConditionalGeneration if cfg.is_plus else tf.GraniteSpeechForConditionalGeneration
    full = cls(cls_cfg(encoder_config=enc, text_config=text, projector_config=projector, has_lora_adapter=False))
    return full.eval()


def make_hf_checkpoint(
    cfg: EncoderConfig,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    full: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
):
    """Save a perturbed random HF checkpoint of `cfg` at `path`; return the fp32 torch encoder it holds.

    `full`: a whole GraniteSpeech(Plus)ForConditionalGeneration (keys `encoder.*`, `projector.*`,
    `language_model.*`) instead of a bare encoder. `dtype`: storage dtype; the returned reference is
    the stored (rounded) weights in fp32. `max_shard_size`: shard the safetensors (e.g. "200KB").
    """
    torch, _ = _require_torch()
    if full:
        model = _full_model(cfg, seed=seed)
        encoder = model.model.encoder
        perturb_(encoder, seed=seed)
    else:
        model = encoder = hf_encoder(cfg, seed=seed)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(os.fspath(path), **kwargs)
    return encoder.float().eval()
