"""Length buckets: which padded length is compiled for an input, so that a stream of lengths compiles a
bounded number of times. Padding is exact (padded frames are masked), so results never depend on it."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from granite_jax.checkpoint.safetensors_file import aligned_empty


def ladder_frames(t: int, per_octave: int = 8) -> int:
    """Smallest m * 2^e >= t with per_octave <= m < 2 * per_octave: 8, 9, ..., 15, 16, 18, ..., 30, 32, 36, ...

    At most 1/per_octave padding (about half that on average), and per_octave compiles per doubling.
    """
    e = max(0, (t - 1).bit_length() - per_octave.bit_length())
    m = -(-t // (1 << e))
    while m >= 2 * per_octave:  # rounding up crossed into the next octave
        e += 1
        m = -(-t // (1 << e))
    return max(m, per_octave) << e


@dataclass(frozen=True)
class BucketPolicy:
    """Which padded length T is compiled for an input of `t` frames.

    - "auto" (default): the next of 8, 9, ..., 15, 16, 18, ..., 30, 32, 36, ... frames (8 steps per
      doubling): at most 12.5% padding, about 4% on average, and a stream of lengths up to N frames
      compiles at most about 8 log2(N / 8) times. Rows longer than one tile (`chunk_blocks`) are cut
      into whole blocks, so there the ladder counts blocks: 30 blocks (120 s) run as 30.
    - "block": the next multiple of context_size (one compile per block count).
    - a sequence of frame counts: the smallest that fits; longer inputs fall back to "auto".
    """

    mode: str | tuple[int, ...] = "auto"

    @classmethod
    def make(cls, spec: str | Sequence[int] | BucketPolicy) -> BucketPolicy:
        if isinstance(spec, BucketPolicy):
            return spec
        if isinstance(spec, str):
            if spec not in ("auto", "block"):
                raise ValueError(f"buckets must be 'auto', 'block' or a list of frame counts, got {spec!r}")
            return cls(spec)
        items = list(spec)
        try:
            frames = tuple(sorted(operator.index(f) for f in items))  # whole numbers only (numpy ints too)
        except TypeError:
            frames = ()
        if not frames or any(isinstance(f, bool) for f in items) or min(frames) <= 0:
            raise ValueError(f"bucket sizes must be positive frame counts (whole numbers), got {items!r}")
        return cls(frames)

    def frames_for(self, t: int, context_size: int, tile_frames: int | None = None) -> int:
        """The padded length for `t` frames (`tile_frames`: the tile size above which rows are cut into blocks)."""
        if isinstance(self.mode, tuple):
            for f in self.mode:
                if f >= t:
                    return f
        if self.mode == "block":
            return math.ceil(t / context_size) * context_size
        if tile_frames is not None and t > tile_frames:  # tiled rows are cut into whole blocks: ladder of blocks
            return ladder_frames(math.ceil(t / context_size)) * context_size
        return ladder_frames(t)


def samples_for_frames(frames: int, hop_length: int) -> int:
    """The most waveform samples that still give `frames` encoder frames ((1 + n // hop) // 2 == frames)."""
    return (2 * frames + 1) * hop_length - 1


def pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    """1-D float32 rows zero-padded into one (len(rows), length) array, 64-byte aligned: XLA's CPU client
    then takes it as it is (an hour of audio is 230 MB)."""
    batch = aligned_empty((len(rows), length), np.float32)
    for i, w in enumerate(rows):
        batch[i, : len(w)] = w
        batch[i, len(w) :] = 0.0
    return batch
