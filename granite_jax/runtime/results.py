"""What the Runner returns, and its one policy for non-finite values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np


@dataclass(frozen=True)
class EncodeResult:
    """What `Runner.encode` returns; row i is utterance i, padded to the longest.

    `features` (B, T, input_dim) front-end output with `feature_lengths` valid frames per row, and
    `hidden_states` (B, T', output_width) with `lengths` valid frames per row (zeros after; T' = T for 4.x,
    subsampled for Speech 5); `audio_embeddings` (B, E, llm_hidden_size), the projector output that
    Granite Speech feeds its language model, with `embedding_counts` valid rows each (HF's
    audio_embed_sizes); None when the checkpoint has no projector (or `embeddings=False`).
    """

    features: jax.Array
    hidden_states: jax.Array
    lengths: np.ndarray
    audio_embeddings: jax.Array | None = None
    embedding_counts: np.ndarray | None = None
    layer_hidden_states: Any = None
    feature_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def utterance(self, i: int) -> dict[str, np.ndarray]:
        """Utterance i's valid rows as numpy arrays (hidden_states, and audio_embeddings if any)."""
        out = {"hidden_states": np.asarray(self.hidden_states[i, : self.lengths[i]])}
        if self.audio_embeddings is not None:
            out["audio_embeddings"] = np.asarray(self.audio_embeddings[i, : self.embedding_counts[i]])
        return out


class WaveformBatch(NamedTuple):
    """Waveforms padded to a bucket: `samples` (B, S) float32, `sample_lengths` and `frames` (B,) int32."""

    samples: np.ndarray
    sample_lengths: np.ndarray
    frames: np.ndarray


def check_finite(finite_in: Any, finite_out: Any, what_in: str, what_out: str) -> None:
    """The one policy for non-finite values: a non-finite input is named; so is a finite input whose result
    overflows float32 (or meets non-finite weights). Nothing non-finite is ever returned."""
    finite_in, finite_out = np.asarray(finite_in), np.asarray(finite_out)
    bad = np.flatnonzero(~finite_in).tolist()
    if bad:
        raise ValueError(f"{what_in} row(s) {bad} hold NaN or infinite values in their valid frames")
    bad = np.flatnonzero(~finite_out).tolist()
    if bad:
        raise ValueError(
            f"the {what_out} of row(s) {bad} is not finite although the {what_in} are: values of this magnitude "
            "overflow float32 in the model (log-mel features lie within about [-2, 4]; samples in [-1, 1]), or "
            "the checkpoint's weights hold NaN or infinite values"
        )
