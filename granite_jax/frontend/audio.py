"""Reading audio files (soundfile) and resampling (soxr), both imported only when used.

Resampling uses soxr's "VHQ" quality (28-bit precision, a stop band below -170 dB): float32 samples carry 24
bits, so "HQ" (20 bits) would be the coarser step of the chain; the cost is small next to the encoder.
"""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np

RESAMPLE_QUALITY = "VHQ"


def resample(x: Any, orig_sr: float, target_sr: float) -> np.ndarray:
    """Resample float audio from `orig_sr` to `target_sr` with soxr (VHQ); float32, same array when equal rates.

    `x` is 1-D (samples) or 2-D (samples, channels); the output has round(n * target_sr / orig_sr) samples.
    """
    for name, sr in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if isinstance(sr, bool) or not isinstance(sr, (int, float, np.number)) or not np.isfinite(sr) or sr <= 0:
            raise ValueError(f"{name} must be a positive number, got {sr!r}")
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"resample needs floating-point samples, got dtype {dtype} (convert integer PCM first)")
    x = np.asarray(x, np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"resample expects a 1-D (samples) or 2-D (samples, channels) array, got shape {x.shape}")
    if orig_sr == target_sr:
        return x
    import soxr

    return np.asarray(soxr.resample(x, orig_sr, target_sr, quality=RESAMPLE_QUALITY), np.float32)


def load_audio(path_or_file: str | os.PathLike | IO[bytes], sampling_rate: int = 16000) -> np.ndarray:
    """Read a WAV/FLAC/OGG (anything libsndfile reads) -> mono float32 in [-1, 1) at `sampling_rate`, 1-D.

    `path_or_file`: a path or a binary file-like object. Integer PCM is scaled by soundfile (int16 / 32768, ...);
    several channels are averaged; the rate is converted with `resample`.
    """
    import soundfile as sf

    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        if not os.path.exists(name):
            raise FileNotFoundError(f"audio file not found: {name}")
        if os.path.isdir(name):
            raise IsADirectoryError(f"expected an audio file, got the directory {name}")
    else:
        name = getattr(path_or_file, "name", None) or f"<{type(path_or_file).__name__}>"
    try:
        data, sr = sf.read(path_or_file, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
        raise ValueError(f"cannot read audio from {name}: {e}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{name} holds no audio samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float64).astype(np.float32)
    return resample(mono, sr, sampling_rate)


__all__ = ["RESAMPLE_QUALITY", "load_audio", "resample"]
