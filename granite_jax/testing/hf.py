"""The torch reference: HF Granite Speech 4.x models made on the spot with transformers, every parameter and
buffer perturbed (random weights, so that no default init hides a bug).

Used by the tests, `granite-jax demo`, the notebooks and the benchmarks. Needs torch and transformers
(`pip install 'granite-jax[torch]'`), imported on first use: nothing in the runtime library imports this.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.projector_config import ProjectorConfig


def require_torch():
    """(torch, transformers), imported on first use so that the library itself never needs them."""
    try:
        return importlib.import_module("torch"), importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(
            f"this needs the PyTorch reference ({e.name} is missing): pip install 'granite-jax[torch]'"
        ) from None


def hf_encoder_config(cfg: EncoderConfig):
    """The transformers encoder config (plus variant when cat_hidden_layers is set)."""
    _, tf = require_torch()
    d = cfg.to_hf_dict()
    d.pop("model_type")
    cls = tf.GraniteSpeechPlusEncoderConfig if cfg.is_plus else tf.GraniteSpeechEncoderConfig
    return cls(**d)


def hf_encoder(cfg: EncoderConfig, *, seed: int = 0):
    """A transformers `GraniteSpeech(Plus)CTCEncoder` in eval mode with every parameter and buffer perturbed."""
    torch, tf = require_torch()
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
    torch, _ = require_torch()
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


# Projector settings `make_hf_checkpoint(..., projector=...)` understands: the Q-Former's (HF names), the
# full config's window_size / downsample_rate, and llm_hidden_size (text_config.hidden_size; keep it even:
# the tiny language model has 2 heads).
_PROJECTOR_TOP_KEYS = ("window_size", "downsample_rate", "llm_hidden_size")


def hf_full_model(cfg: EncoderConfig, *, seed: int = 0, projector: Any = None, perturb: bool = True):
    """A whole GraniteSpeech(Plus)ForConditionalGeneration in eval mode around an encoder of `cfg`.

    With `perturb` (default) every encoder and projector parameter and buffer goes through `perturb_` (the
    projector's learned query, LayerNorm gains and biases included); the tiny language model keeps its init.
    `projector`: projector settings, a dict (Q-Former fields by HF name, window_size, downsample_rate,
    llm_hidden_size) or a ProjectorConfig; the default is a 1-layer, 32-wide Q-Former with window 15 /
    downsample 5.
    """
    torch, tf = require_torch()
    torch.manual_seed(seed)
    if projector is not None and not isinstance(projector, dict):  # a ProjectorConfig
        import dataclasses

        projector = dataclasses.asdict(projector)
    settings = dict(projector or {})
    unknown = set(settings) - set(ProjectorConfig.qformer_fields()) - set(_PROJECTOR_TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown projector settings {sorted(unknown)}")
    text = dict(
        model_type="granite",
        hidden_size=settings.pop("llm_hidden_size", 32),
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    top = {k: settings.pop(k) for k in ("window_size", "downsample_rate") if k in settings}
    qformer = dict(
        model_type="blip_2_qformer",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=cfg.output_width,
    )
    qformer.update(settings)
    enc = cfg.to_hf_dict()
    cls_cfg = tf.GraniteSpeechPlusConfig if cfg.is_plus else tf.GraniteSpeechConfig
    cls = tf.GraniteSpeechPlusForConditionalGeneration if cfg.is_plus else tf.GraniteSpeechForConditionalGeneration
    full_cfg = cls_cfg(encoder_config=enc, text_config=text, projector_config=qformer, has_lora_adapter=False, **top)
    model = cls(full_cfg).eval()
    if perturb:
        perturb_(model.model.encoder, seed=seed)
        perturb_(model.model.projector, seed=seed + 10_000)
    return model


def make_hf_full_checkpoint(
    cfg: EncoderConfig,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    projector: Any = None,
):
    """Save `hf_full_model(cfg, seed=seed, projector=projector)` at `path`; return it in fp32, eval mode.

    `dtype`: storage dtype; the returned model holds the stored (rounded) weights in fp32.
    `max_shard_size`: shard the safetensors (e.g. "200KB").
    """
    torch, _ = require_torch()
    model = hf_full_model(cfg, seed=seed, projector=projector).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(os.fspath(path), **kwargs)
    return model.float().eval()


def make_hf_checkpoint(
    cfg: EncoderConfig,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    full: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    projector: Any = None,
):
    """Save a perturbed random HF checkpoint of `cfg` at `path`; return the fp32 torch encoder it holds.

    `full`: a whole GraniteSpeech(Plus)ForConditionalGeneration (keys `encoder.*`, `projector.*`,
    `language_model.*`) instead of a bare encoder, see `make_hf_full_checkpoint` (which returns the whole
    model; `projector` is passed on to it). `dtype`: storage dtype; the returned reference is the stored
    (rounded) weights in fp32. `max_shard_size`: shard the safetensors (e.g. "200KB").
    """
    torch, _ = require_torch()
    if full:
        full_model = make_hf_full_checkpoint(
            cfg, path, seed=seed, dtype=dtype, max_shard_size=max_shard_size, projector=projector
        )
        return full_model.model.encoder
    if projector is not None:
        raise ValueError("projector settings need full=True (a bare encoder checkpoint has no projector)")
    model = hf_encoder(cfg, seed=seed).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(os.fspath(path), **kwargs)
    return model.float().eval()


def hf_audio_features(model: Any, features: Any) -> Any:
    """HF `get_audio_features(features).pooler_output` (encoder, then projector) of a full model, as numpy."""
    torch, _ = require_torch()
    import numpy as np

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(features, np.float32))
        return model.get_audio_features(x).pooler_output.numpy()


def hf_project(model: Any, hidden_states: Any) -> Any:
    """The HF projector of a full model on encoder hidden states (B, T, W), as numpy."""
    torch, _ = require_torch()
    import numpy as np

    with torch.no_grad():
        return model.model.projector(torch.from_numpy(np.asarray(hidden_states, np.float32))).numpy()


def hf_ctc_loss(encoder: Any, features: Any, lengths: Any, labels: Any, label_lengths: Any, mid_weight: float = 0.0):
    """The training loss granite_jax.train.ctc_loss defines, on a torch `GraniteSpeech(Plus)CTCEncoder` in train
    mode: `F.ctc_loss(log_softmax(out(h)).transpose(0, 1), ..., blank=0, reduction="mean", zero_infinity=True)`
    on the final hidden states, mixed with the same loss on the self-conditioning layer's `out` logits.

    Runs backward; returns the loss as a float. The caller reads `.grad` and the BatchNorm buffers.
    """
    torch, _ = require_torch()
    import numpy as np

    mids = []
    hook = encoder.out.register_forward_hook(lambda m, i, o: mids.append(o) if not mids else None)
    try:
        h = encoder(torch.as_tensor(np.asarray(features))).last_hidden_state
    finally:
        hook.remove()
    h = h[..., -encoder.config.hidden_dim :]
    args = (
        torch.as_tensor(np.asarray(labels), dtype=torch.long),
        torch.as_tensor(np.asarray(lengths), dtype=torch.long),
        torch.as_tensor(np.asarray(label_lengths), dtype=torch.long),
    )

    def ctc(logits):
        logp = torch.log_softmax(logits, dim=-1).transpose(0, 1)
        return torch.nn.functional.ctc_loss(logp, *args, blank=0, reduction="mean", zero_infinity=True)

    loss = ctc(encoder.out(h))
    if mid_weight:
        loss = (1 - mid_weight) * loss + mid_weight * ctc(mids[0])
    loss.backward()
    return float(loss.detach())
