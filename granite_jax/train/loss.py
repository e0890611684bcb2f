"""The CTC loss, as users compare it with torch's (for both families: a 4.x encoder or Granite Speech 5).

`ctc_loss(model, batch)` is `F.ctc_loss(log_softmax(out(h)).transpose(0, 1), labels, lengths, label_lengths,
blank=0, reduction="mean", zero_infinity=True)` on the encoder's final hidden states `h`: each utterance's
negative log-likelihood divided by its label length, averaged over the batch. An utterance whose labels
cannot be aligned to its frames (fewer frames than labels plus repeats) contributes 0 loss and 0 gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from granite_jax.models.conformer import PLAIN, Strategy

Batch = Mapping[str, Any]  # features (B, T, F), lengths (B,), labels (B, L), label_lengths (B,)


def _alignable(lengths: Int[Array, " b"], labels: Int[Array, "b l"], label_lengths: Int[Array, " b"]) -> Array:
    """(B,) whether CTC can align each label sequence to its frames: T >= L + (repeated neighbours)."""
    pos = jnp.arange(labels.shape[1])[None, :]
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & (pos[:, 1:] < label_lengths[:, None]), axis=1)
    return lengths >= label_lengths + repeats


def ctc_per_utterance(
    logits: Float[Array, "b t v"],
    lengths: Int[Array, " b"],
    labels: Int[Array, "b l"],
    label_lengths: Int[Array, " b"],
    blank_id: int = 0,
) -> tuple[Float[Array, " b"], Array]:
    """(each utterance's NLL / max(label length, 1), 0 where it cannot be aligned; the alignable mask)."""
    t, n = logits.shape[1], labels.shape[1]
    logit_paddings = (jnp.arange(t)[None, :] >= lengths[:, None]).astype(jnp.float32)
    label_paddings = (jnp.arange(n)[None, :] >= label_lengths[:, None]).astype(jnp.float32)
    nll = optax.ctc_loss(logits.astype(jnp.float32), logit_paddings, labels, label_paddings, blank_id=blank_id)
    ok = _alignable(lengths, labels, label_lengths)
    return jnp.where(ok, nll / jnp.maximum(label_lengths, 1), 0.0), ok


def ctc_loss_and_metrics(
    model: Any,
    batch: Batch,
    mid_weight: float = 0.0,
    key: Array | None = None,
    strategy: Strategy = PLAIN,
) -> tuple[Array, dict[str, Array]]:
    """`ctc_loss` and its parts: {"loss", "final", "mid", "unalignable" (count), "frames"}."""
    features = jnp.asarray(batch["features"])
    lengths = jnp.asarray(batch["lengths"], jnp.int32)
    labels = jnp.asarray(batch["labels"], jnp.int32)
    label_lengths = jnp.asarray(batch["label_lengths"], jnp.int32)
    valid = jnp.arange(features.shape[1])[None, :] < lengths[:, None]
    want_mid = not (isinstance(mid_weight, (int, float)) and mid_weight == 0)
    out = model.forward(features, valid, strategy=strategy, key=key, mid_logits=want_mid)
    blank = model.config.blank_id
    frames = lengths if out.valid is None else jnp.sum(out.valid, axis=1).astype(jnp.int32)  # Speech 5: subsampled
    per_final, ok = ctc_per_utterance(model.ctc_logits(out.last_hidden_state), frames, labels, label_lengths, blank)
    loss_final = jnp.mean(per_final)
    loss, loss_mid = loss_final, jnp.zeros(())
    if want_mid:
        if out.mid_logits is None:
            raise ValueError(f"mid_weight needs a self-conditioning layer; this encoder has {model.config.num_layers}")
        mid_frames = (
            frames
            if out.mid_logits.shape[1] == out.last_hidden_state.shape[1]
            else _frames_at(model, lengths, out.mid_logits.shape[1])
        )
        per_mid, _ = ctc_per_utterance(out.mid_logits, mid_frames, labels, label_lengths, blank)
        loss_mid = jnp.mean(per_mid)
        loss = (1.0 - mid_weight) * loss_final + mid_weight * loss_mid
    metrics = {
        "loss": loss,
        "final": loss_final,
        "mid": loss_mid,
        "unalignable": jnp.sum(~ok),
        "frames": jnp.sum(lengths),
    }
    return loss, metrics


def _frames_at(model, lengths: Array, width: int) -> Array:
    """Speech 5: valid frames at the self-conditioning block's resolution (halved per subsampling block
    before it)."""
    cfg = model.config
    for i in cfg.subsample_layers:
        if i < cfg.self_conditioning_layer:
            lengths = lengths // 2
    return jnp.minimum(lengths, width)


def ctc_loss(model: Any, batch: Batch, mid_weight: float = 0.0, key: Array | None = None) -> Array:
    """The CTC loss of `model` on `batch` (see the module docstring), mixed with the intermediate CTC loss at
    the self-conditioning layer as `(1 - mid_weight) * final + mid_weight * mid`. For Granite Speech 5 the frames
    are the subsampled ones and the blank is the pad token: with mid_weight 0, the loss `GraniteSpeech5ForCTC`
    computes from `labels`.

    `batch`: `features` (B, T, input_dim), `lengths` (B,) valid frames, `labels` (B, L) ints padded with 0,
    `label_lengths` (B,). `key`: the dropout key in train mode. Differentiate with
    `nnx.value_and_grad(ctc_loss)(model, batch)`.
    """
    return ctc_loss_and_metrics(model, batch, mid_weight, key)[0]


def text_to_labels(texts: Sequence[str], output_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (labels (B, L) int32 padded with 0, label_lengths (B,)) for the 4.x character heads.

    Those heads read id i as `chr(i)`, so a character's label is `ord(c)`; characters outside
    1..output_dim - 1 cannot be labelled and are refused, by name.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        ids = [ord(c) for c in text]
        bad = sorted({c for c in text if not 1 <= ord(c) < output_dim})
        if bad:
            shown = ", ".join(f"{c!r} ({ord(c)})" for c in bad[:10])
            raise ValueError(
                f"text {i} has characters this head ({output_dim} outputs, ids 1..{output_dim - 1}) cannot label: "
                f"{shown}{' ...' if len(bad) > 10 else ''}"
            )
        rows.append(ids)
    width = max([len(r) for r in rows] + [1])
    labels = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        labels[i, : len(r)] = r
    return labels, np.array([len(r) for r in rows], np.int32)
