"""Granite Speech log-mel features in JAX, exact against HF's `GraniteSpeechFeatureExtractor` (no torch).

HF computes torchaudio's `MelSpectrogram` with these settings (torchaudio's defaults beside the five
fields of `config.FeatureConfig`): a periodic Hann window of `win_length` centred in `n_fft`,
`center=True` with reflect padding of `n_fft // 2` samples, power 2, a one-sided FFT, and an HTK mel
filterbank without normalisation from 0 Hz to `sampling_rate // 2`. Then `log10(max(mel, 1e-10))`, a floor
8 below the batch's maximum, `/ 4 + 1`, an odd last frame dropped and pairs of frames stacked into
`2 * n_mels` wide encoder frames.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.runtime.buckets import ladder_frames, pad_rows, samples_for_frames
from granite_jax.runtime.inputs import check_float_samples, waveform_rows

BatchMode = Literal["per_utterance", "hf"]
_BATCH_MODES = ("per_utterance", "hf")


def mel_filterbank(cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """`torchaudio.functional.melscale_fbanks` (HTK, no norm, 0 Hz to sr // 2) as a (num_freqs, n_mels) float32."""
    return _mel_filterbank(cfg).copy()


@functools.lru_cache(maxsize=8)
def _mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    # Computed in float64 and rounded once; torchaudio computes in float32 (differences ~1e-7).
    f_max = float(cfg.sampling_rate // 2)
    all_freqs = np.linspace(0.0, cfg.sampling_rate // 2, cfg.num_freqs)
    m_max = 2595.0 * np.log10(1.0 + f_max / 700.0)
    m_pts = np.linspace(0.0, m_max, cfg.n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _hann(win_length: int) -> np.ndarray:
    """`torch.hann_window(win_length)`: periodic."""
    n = np.arange(win_length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)).astype(np.float32)


def num_mel_frames(num_samples, cfg: FeatureConfig = FeatureConfig()):
    """STFT frames of a waveform with `center=True`: 1 + n // hop (int, or elementwise on arrays)."""
    return 1 + num_samples // cfg.hop_length


def num_encoder_frames(num_samples, cfg: FeatureConfig = FeatureConfig()):
    """Encoder frames (pairs of mel frames, an odd last one dropped): (1 + n // hop) // 2, as HF's processor."""
    return num_mel_frames(num_samples, cfg) // 2


def min_samples(cfg: FeatureConfig | Speech5FeatureConfig = FeatureConfig()) -> int:
    """The shortest waveform accepted: torch's reflect padding needs n > n_fft // 2, and one encoder frame n >= hop."""
    return max(cfg.n_fft // 2 + 1, cfg.hop_length)


def max_amplitude(cfg: FeatureConfig = FeatureConfig()) -> float:
    """The largest |sample| whose log-mel power stays finite in float32, with a factor 4 of margin.

    A frame's power per mel bin is at most (filterbank column sum) x (window sum x peak)^2.
    """
    cfg = cfg.mel() if isinstance(cfg, Speech5FeatureConfig) else cfg
    window_sum = float(_hann(cfg.win_length).astype(np.float64).sum())
    filter_sum = float(_mel_filterbank(cfg).astype(np.float64).sum(axis=0).max())
    return math.sqrt(float(np.finfo(np.float32).max) / (filter_sum * window_sum**2)) / 4


def check_num_samples(
    num_samples: int, cfg: FeatureConfig = FeatureConfig(), what: str = "waveform", minimum: int | None = None
) -> None:
    """Raise ValueError when a waveform of `num_samples` is too short (`minimum`, or `min_samples(cfg)`)."""
    least = min_samples(cfg) if minimum is None else minimum
    if num_samples < least:
        raise ValueError(
            f"{what} has {num_samples} samples; the feature extractor needs at least {least} "
            f"({least / cfg.sampling_rate * 1000:.1f} ms at {cfg.sampling_rate} Hz)"
        )


MEL_CHUNK_FRAMES = 16384  # mel frames (10 ms each) whose frame matrix and spectrum are held at once: ~130 MB


def mel_power(x: jax.Array, lens: jax.Array, frames: int, cfg: FeatureConfig) -> jax.Array:
    """(B, frames, n_mels) mel power of the first `frames` STFT frames of each row, as torchaudio's
    `MelSpectrogram(center=True)` computes it on that row alone: reflect-padded at its start and at its own
    end `lens[i]` (B, 1). The buffer must hold each row's samples up to its length; what follows is ignored.

    The (frames, win_length) frame matrix and its spectrum are worked through `MEL_CHUNK_FRAMES` at a time.
    """
    batch, n = x.shape
    hop, win, n_fft = cfg.hop_length, cfg.win_length, cfg.n_fft
    # Frame t covers samples [t * hop + off, t * hop + off + win) of the reflect-padded row: torch.stft pads
    # n_fft // 2 on the left and centres the window in n_fft. |rfft| does not see where in n_fft the window sits.
    off = (n_fft - win) // 2 - n_fft // 2
    k = -(-win // hop)  # hop-sized blocks a frame spans

    def mel_frames(first: jax.Array | int, count: int) -> jax.Array:  # (B, count, n_mels) from frame `first`
        j = first * hop + jnp.arange((count + k - 1) * hop, dtype=jnp.int32)[None, :] + off
        j = jnp.abs(j)  # reflect at the start (no edge repeat)
        j = jnp.where(j >= lens, 2 * (lens - 1) - j, j)  # reflect at each row's own end
        j = jnp.clip(j, 0, n - 1)  # only frames past a row's length reach here; they are masked later
        signal = jnp.take_along_axis(x, j, axis=1, mode="clip")
        blocks = signal.reshape(batch, count + k - 1, hop)
        framed = jnp.concatenate([blocks[:, i : i + count] for i in range(k)], axis=-1)[..., :win]
        spec = jnp.fft.rfft(framed * _hann(win), n=n_fft, axis=-1)
        power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
        return jnp.matmul(power, _mel_filterbank(cfg), precision=jax.lax.Precision.HIGHEST)

    if batch * frames <= MEL_CHUNK_FRAMES:
        return mel_frames(0, frames)
    count = max(1, MEL_CHUNK_FRAMES // batch)  # long audio: chunk by chunk (~8 KB of spectrum a frame)
    chunks = -(-frames // count)
    mel = jax.lax.map(lambda i: mel_frames(i * count, count), jnp.arange(chunks))  # (chunks, B, count, m)
    return jnp.moveaxis(mel, 0, 1).reshape(batch, chunks * count, -1)[:, :frames]


def log_mel(
    waveforms: jax.Array,
    lengths: jax.Array,
    cfg: FeatureConfig = FeatureConfig(),
    *,
    hf_batch: bool = False,
) -> jax.Array:
    """(B, N) float waveforms -> (B, (1 + N // hop) // 2, 2 * n_mels) features; pure and jit-able (cfg static).

    Per-utterance (default): row i's first `num_encoder_frames(lengths[i])` frames equal HF's output for that row
    alone, unpadded (reflect padding at its own end, floor from its own maximum); later frames are 0.
    `hf_batch=True`: every row is treated as `max(lengths)` samples long, i.e. HF's extractor on the list
    zero-padded to the longest (pass `lengths` = N for HF on the whole (B, N) array); later frames are 0.
    `lengths` must lie in [min_samples(cfg), N]; nothing is checked here (`extract_features` checks).
    Memory: O(N) for the features, and the (frames, win_length) frame matrix and its spectrum are worked
    through `MEL_CHUNK_FRAMES` frames at a time.
    """
    x = jnp.asarray(waveforms, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"log_mel expects (batch, samples) waveforms, got shape {x.shape}")
    batch, n = x.shape
    frames = 1 + n // cfg.hop_length  # mel frames of the padded batch
    lens = jnp.asarray(lengths, jnp.int32).reshape(batch, 1)
    if hf_batch:
        lens = jnp.broadcast_to(jnp.max(lens), (batch, 1))
    mel = mel_power(x, lens, frames, cfg)
    logmel = jnp.log10(jnp.maximum(mel, 1e-10))
    valid = jnp.arange(frames)[None, :] < num_mel_frames(lens, cfg)  # (B, frames)
    mx = jnp.max(jnp.where(valid[..., None], logmel, -jnp.inf), axis=(1, 2), keepdims=True)
    logmel = jnp.maximum(logmel, mx - 8.0) / 4 + 1

    t_out = frames // 2
    out = logmel[:, : 2 * t_out].reshape(batch, t_out, 2 * cfg.n_mels)
    enc_valid = jnp.arange(t_out)[None, :] < num_encoder_frames(lens, cfg)
    return jnp.where(enc_valid[..., None], out, 0.0)


_log_mel_jit = jax.jit(log_mel, static_argnames=("cfg", "hf_batch"))


# -- Granite Speech 5 ----------------------------------------------------------------------------------------
def speech5_frames(num_samples, cfg: Speech5FeatureConfig = Speech5FeatureConfig()):
    """Encoder input frames of a waveform for Speech 5: ceil((n // hop) / 2) (the last pair filled)."""
    return -(-(num_samples // cfg.hop_length) // 2)


def speech5_features(
    waveforms: jax.Array,
    lengths: jax.Array,
    cfg: Speech5FeatureConfig = Speech5FeatureConfig(),
    *,
    hf_batch: bool = False,
) -> jax.Array:
    """`GraniteSpeech5FeatureExtractor` in JAX: (B, N) waveforms -> (B, ceil((N // hop) / 2), 4 * n_mels).

    Per row (of `lengths[i]` samples, or the longest with `hf_batch`): n // hop mel frames rounded up to a
    whole pair, the waveform zero-extended to fill the last one; log10 mel, floored `logmel_floor_db` below
    the row's maximum, / 4 + 1; torchaudio's `compute_deltas` (its replicated edges at the row's own ends);
    [log-mel, delta] per frame, frames stacked in pairs. Frames past a row's length are 0.
    """
    x = jnp.asarray(waveforms, jnp.float32)
    batch, n = x.shape
    hop, mcfg = cfg.hop_length, cfg.mel()
    lens = jnp.asarray(lengths, jnp.int32).reshape(batch, 1)
    if hf_batch:
        lens = jnp.broadcast_to(jnp.max(lens), (batch, 1))
    rows = 2 * speech5_frames(lens, cfg)  # (B, 1) mel frames each row keeps
    extended = jnp.maximum(lens, (rows - 1) * hop + 1)  # zero-extended to fill its last pair
    x = jnp.pad(x, ((0, 0), (0, hop)))  # room for that extension (zeros)
    frames = 2 * speech5_frames(n, cfg)
    logmel = jnp.log10(jnp.maximum(mel_power(x, extended, frames, mcfg), 1e-10))  # (B, F, m)
    t = jnp.arange(frames)[None, :]
    valid = (t < rows)[..., None]
    mx = jnp.max(jnp.where(valid, logmel, -jnp.inf), axis=(1, 2), keepdims=True)
    logmel = jnp.maximum(logmel, mx - cfg.logmel_floor_db) / 4 + 1
    # compute_deltas: sum_k k (x[t + k] - x[t - k]) / (2 sum_k k^2), the frames replicated past each end
    half = (cfg.delta_win_length - 1) // 2
    last = rows - 1
    delta = jnp.zeros_like(logmel)
    for k in range(1, half + 1):
        ahead = jnp.take_along_axis(logmel, jnp.clip(t + k, 0, last)[..., None], axis=1)
        behind = jnp.take_along_axis(logmel, jnp.clip(t - k, 0, last)[..., None], axis=1)
        delta = delta + k * (ahead - behind)
    delta = delta / (2 * sum(k * k for k in range(1, half + 1)))
    out = jnp.concatenate([logmel, delta], axis=-1).reshape(batch, frames // 2, 4 * cfg.num_mel_bins)
    return jnp.where((jnp.arange(frames // 2)[None, :] < rows // 2)[..., None], out, 0.0)


def prepare_waveforms(
    waveforms: Any,
    sampling_rate: float = 16000,
    cfg: FeatureConfig = FeatureConfig(),
    names: Sequence[str] | None = None,
    minimum: int | None = None,
) -> list[np.ndarray]:
    """Validate and resample -> a list of 1-D float32 numpy arrays at `cfg.sampling_rate`.

    Raises TypeError for non-float samples, ValueError for a wrong shape, several channels, an empty input,
    NaN/inf, or a waveform shorter than `min_samples(cfg)` (after resampling).
    """
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.number)) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}")
    out = []
    for name, w in waveform_rows(waveforms, names):
        check_float_samples(w.dtype, name)
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported below
            w = np.asarray(w, np.float32)
        if w.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{name} contains NaN or infinite samples (as float32)")
        peak = float(np.max(np.abs(w)))
        if peak > max_amplitude(cfg):
            raise ValueError(
                f"{name} has peak amplitude {peak:.3g}; float samples are expected in [-1, 1], and above "
                f"{max_amplitude(cfg):.3g} the log-mel power overflows float32"
            )
        if sampling_rate != cfg.sampling_rate:
            from granite_jax.frontend.audio import resample

            w = resample(w, sampling_rate, cfg.sampling_rate)
            check_num_samples(w.shape[0], cfg, f"{name} (resampled from {sampling_rate} Hz)", minimum)
        else:
            check_num_samples(w.shape[0], cfg, name, minimum)
        out.append(w)
    return out


def extract_features(
    waveforms: Any,
    sampling_rate: float = 16000,
    *,
    batch_mode: BatchMode = "per_utterance",
    cfg: FeatureConfig = FeatureConfig(),
) -> tuple[jax.Array, np.ndarray]:
    """Waveforms -> (features (B, T, 2 * n_mels) jax array, lengths (B,) int32 encoder frames per utterance).

    `waveforms`: one 1-D float array, a (B, N) array, or a list/tuple of 1-D arrays (numpy or jax), resampled to
    `cfg.sampling_rate` when `sampling_rate` differs, then zero-padded to the longest. `batch_mode`:
    "per_utterance" gives each row what it gives alone, zeros past its length (pass `lengths` to the encoder);
    "hf" gives exactly HF's extractor on the list, padding included. `lengths` is HF's encoder length of each
    utterance, (1 + samples // hop) // 2, in both modes.
    """
    if batch_mode not in _BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {_BATCH_MODES}, got {batch_mode!r}")
    rows = prepare_waveforms(waveforms, sampling_rate, cfg)
    raw = np.array([w.shape[0] for w in rows], np.int32)
    frames = num_encoder_frames(raw, cfg).astype(np.int32)
    t = int(frames.max())
    # padded to a length bucket, so that a stream of lengths compiles a bounded number of times
    batch = pad_rows(rows, max(int(raw.max()), samples_for_frames(ladder_frames(t), cfg.hop_length)))
    features = _log_mel_jit(batch, raw, cfg, hf_batch=batch_mode == "hf")
    return features[:, :t], frames


__all__ = [
    "extract_features",
    "speech5_features",
    "speech5_frames",
    "log_mel",
    "mel_filterbank",
    "min_samples",
    "num_encoder_frames",
    "num_mel_frames",
    "prepare_waveforms",
]
