"""What users pass, checked once, in one place: waveforms, feature batches, lengths.

Anything `np.asarray` can read is accepted (numpy, jax, lists, torch tensors on any device, bf16/fp16);
everything else gets a `TypeError` or `ValueError` that names the argument, the row and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.frontend.audio import load_audio
from granite_jax.runtime.buckets import pad_rows
from granite_jax.runtime.results import WaveformBatch


def as_array(x: Any, name: str) -> np.ndarray | jax.Array:
    """A jax Array as it is; anything else as numpy (torch tensors detached and moved to the host first)."""
    if isinstance(x, jax.Array | np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "torch":  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:
            x = x.float()  # bf16 has no numpy counterpart; the models take float32 input anyway
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an array (numpy, jax, torch or a nested list), got {type(x).__name__}: {e}"
        ) from None


def is_float(dtype: Any) -> bool:
    """Floating point, bfloat16 included (numpy's issubdtype does not count it)."""
    return jnp.issubdtype(dtype, jnp.floating)


def check_float_samples(dtype: np.dtype, name: str) -> None:
    """TypeError unless `dtype` is floating point, with a hint for integer PCM."""
    if is_float(dtype):
        return
    hint = ""
    if jnp.issubdtype(dtype, jnp.integer):
        hint = " (integer PCM: read files with granite_jax.load_audio, or divide int16 by 32768)"
    raise TypeError(f"{name} has dtype {dtype}; expected floating-point samples in [-1, 1]{hint}")


def _mono(w: np.ndarray | jax.Array, name: str) -> np.ndarray | jax.Array:
    """A list entry as 1-D samples: (N,), or (1, N) / (N, 1) as HF's processor takes them."""
    if w.ndim == 1:
        return w
    if w.ndim == 2 and 1 in w.shape:
        return w.reshape(-1)
    if w.ndim == 2:
        channels, axis = (w.shape[0], 0) if w.shape[0] < w.shape[1] else (w.shape[1], 1)
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}: {channels} channels; expected mono samples, 1-D or (1, N). "
            f"Mix down first (e.g. x.mean(axis={axis})), or read files with granite_jax.load_audio, which does"
        )
    raise ValueError(f"{name} has shape {tuple(w.shape)}; expected 1-D mono samples or (1, N)")


def utterances(items: Any, name: str = "waveforms") -> Any:
    """Any iterable of utterances (a generator, a map, a deque) as a list; arrays and lists as they are."""
    if isinstance(items, Mapping):
        raise TypeError(f"{name} must be an array or a sequence of them, not a {type(items).__name__}")
    if isinstance(items, Iterator) or (
        not isinstance(items, (list, tuple, str, bytes, np.ndarray, jax.Array))
        and not hasattr(items, "__array__")
        and not hasattr(items, "shape")
        and hasattr(items, "__iter__")
    ):
        return list(items)
    return items


def waveform_rows(waveforms: Any, names: Sequence[str] | None = None) -> list[tuple[str, np.ndarray | jax.Array]]:
    """(name, 1-D samples) of each utterance: one 1-D array, a (B, N) batch, or any iterable of utterances.

    `names`: what error messages call the utterances of a list (file names, say); "waveform i" by default.
    """
    waveforms = utterances(waveforms)
    if isinstance(waveforms, (str, bytes)):
        raise TypeError(
            "waveforms must be arrays of samples, not a string: read files with granite_jax.load_audio "
            "(or pass paths to transcribe)"
        )
    if isinstance(waveforms, (list, tuple)):
        if len(waveforms) == 0:
            raise ValueError("got an empty list of waveforms")
        if names is not None and len(names) != len(waveforms):
            raise ValueError(f"got {len(names)} names for {len(waveforms)} waveforms")
        rows = []
        for i, w in enumerate(waveforms):
            name = f"waveform {i}" if names is None else str(names[i])
            rows.append((name, _mono(as_array(w, name), name)))
        return rows
    w = as_array(waveforms, "waveforms")
    if w.ndim == 1:
        return [("waveform", w)]
    if w.ndim == 2:
        if w.shape[0] == 0:
            raise ValueError(f"got a {tuple(w.shape)} batch: no waveforms")
        if w.shape[1] == 1 and w.shape[0] > 1:  # (samples, 1): one mono column
            return [("waveform", w.reshape(-1))]
        if 1 < w.shape[1] <= 8 < w.shape[0]:
            raise ValueError(
                f"waveforms have shape {tuple(w.shape)}, which looks like (samples, channels) audio; pass "
                f"mono samples (e.g. x.mean(axis=1)), or a (batch, samples) array of mono rows"
            )
        return [(f"waveform {i}", row) for i, row in enumerate(w)]
    raise ValueError(f"waveform has shape {tuple(w.shape)}; expected 1-D (one utterance) or 2-D (batch, samples)")


def feature_batch(
    x: Any, width: int, name: str = "features", width_name: str = "input_dim"
) -> tuple[np.ndarray | jax.Array, bool]:
    """(B, T, width) floats (a 2-D (T, width) input becomes one row) and whether it was 2-D."""
    x = as_array(x, name)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be (batch, frames, {width}), got shape {tuple(x.shape)}")
    b, t, f = x.shape
    if f != width:
        raise ValueError(f"{name} have {f} channels per frame; this encoder takes {width_name}={width}")
    if t == 0 or b == 0:
        raise ValueError(f"{name} must have at least one frame and one row, got shape {tuple(x.shape)}")
    if not is_float(x.dtype):
        raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
    return x, squeeze


def lengths(lengths: Any, b: int, t: int, name: str = "lengths", minimum: int = 1) -> np.ndarray:
    """(b,) int32 valid frames per row, each in [minimum, t]; all t when None."""
    if t < minimum:
        raise ValueError(
            f"this encoder needs at least {minimum} frames per row (each subsampling block halves them); got {t}"
        )
    if lengths is None:
        return np.full((b,), t, np.int32)
    lens = np.asarray(as_array(lengths, name))
    if lens.shape != (b,) or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"{name} must be {b} integers (one per row), got {lengths!r}")
    if lens.min() < minimum or lens.max() > t:
        raise ValueError(f"{name} must lie in [{minimum}, {t}] (the number of frames), got {lens.tolist()}")
    return lens.astype(np.int32)


__all__ = ["as_array", "check_float_samples", "feature_batch", "is_float", "lengths", "waveform_rows"]


def audio_or_paths(items: Any, sampling_rate: float, file_rate: int) -> tuple[Any, float, bool]:
    """Waveforms as given, or audio file paths read at `file_rate`: (utterances, their rate, whether one was
    given alone)."""
    items = utterances(items, "waveforms_or_paths")
    single = isinstance(items, (str, os.PathLike))
    if single:
        items = [items]
    if isinstance(items, (list, tuple)) and items and all(isinstance(x, (str, os.PathLike)) for x in items):
        return [load_audio(p, file_rate) for p in items], file_rate, single
    return items, sampling_rate, single


def waveform_batch(
    waveforms: Any, sampling_rate: float, family: Any, bucket_frames: Callable[[int], int], hf: bool
) -> WaveformBatch:
    """Validated waveforms, zero-padded to the largest sample count of their frame bucket. In HF batch mode
    every row counts as long as the longest (zeros inside), as transformers' extractor sees a padded batch."""
    from granite_jax.frontend.features import prepare_waveforms  # it imports this module

    waves = prepare_waveforms(waveforms, sampling_rate, family.feature_config, minimum=family.min_samples())
    n = np.array([len(w) for w in waves], np.int32)
    frames = np.asarray(family.frames(n)).astype(np.int32)
    samples = pad_rows(waves, family.samples_for_frames(bucket_frames(int(frames.max()))))
    return WaveformBatch(samples, np.full_like(n, n.max()) if hf else n, frames)


def split_waveforms(batch: WaveformBatch, family: Any, rows: Any, hf: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(samples, sample lengths, frames) split over `rows` (a `RowMesh`). Dummy rows are silence of one frame;
    in HF mode as long as the others, so that each device's own maximum (log_mel's hf_batch) is the batch's."""
    dummy = int(batch.sample_lengths.max()) if hf else family.min_samples()
    t = int(batch.frames.max())
    # HF mode, 4.x: its encoder has no mask and sees every frame; Speech 5's takes the extractor's mask
    frames = np.full_like(batch.frames, t) if hf and not family.masks_padding else batch.frames
    return (
        rows.split_rows(batch.samples),
        rows.split_rows(batch.sample_lengths, fill=dummy),
        rows.split_rows(frames, fill=1),
    )
