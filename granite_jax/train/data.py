"""Training data: NeMo-style manifests, batches of similar duration, and their features and labels.

A manifest is JSON lines with `audio_filepath`, `text` and optionally `duration` (seconds); relative paths
are resolved against the manifest's folder. The batch order is a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from granite_jax.runtime.buckets import ladder_frames


@dataclasses.dataclass(frozen=True)
class Utterance:
    audio_filepath: str
    text: str
    duration: float


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and the line."""


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> list[Utterance]:
    """The utterances of a NeMo manifest; every bad line is reported with its number (all at once)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path}: {getattr(e, 'strerror', None) or e}") from None
    out, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(entry, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        audio, text, duration = entry.get("audio_filepath"), entry.get("text"), entry.get("duration")
        if not isinstance(audio, str) or not audio:
            problems.append(f"line {n}: no audio_filepath")
            continue
        if not isinstance(text, str):
            problems.append(f"line {n}: no text (a string)")
            continue
        audio = audio if os.path.isabs(audio) else os.path.join(folder, audio)
        if check_files and not os.path.isfile(audio):
            problems.append(f"line {n}: audio file not found: {audio}")
            continue
        if duration is None:
            duration = _duration(audio) if check_files else 0.0
        elif isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration >= 0:
            problems.append(f"line {n}: duration must be a non-negative number, got {duration!r}")
            continue
        out.append(Utterance(audio, text, float(duration)))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ManifestError(f"{path}:\n  {shown}")
    if not out:
        raise ManifestError(f"{path} lists no utterances")
    return out


def _duration(path: str) -> float:
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises its own error types
        raise ManifestError(f"cannot read {path}: {e}") from None
    return info.frames / info.samplerate


def epoch_batches(utterances: Sequence[Utterance], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (lists of indices) of one epoch: shuffled by (seed, epoch), then sorted by duration within
    windows of 32 batches so that a batch holds similar lengths (little padding, few length buckets), the
    batches themselves shuffled; an incomplete last batch is dropped (a different one each epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(utterances))
    window = 32 * batch_size
    batches = []
    for start in range(0, len(order) - batch_size + 1, window):
        chunk = sorted(order[start : start + window], key=lambda i: (utterances[i].duration, i))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return [[int(i) for i in b] for b in batches]


class BatchSchedule:
    """The batch for every step: epochs of `epoch_batches`, one after another."""

    def __init__(self, utterances: Sequence[Utterance], batch_size: int, seed: int):
        if len(utterances) < batch_size:
            raise ValueError(f"a batch of {batch_size} needs at least that many utterances; got {len(utterances)}")
        self.utterances, self.batch_size, self.seed = list(utterances), batch_size, seed
        self._epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            self._epochs = {e: epoch_batches(self.utterances, self.batch_size, self.seed, e)}
        return self._epochs[e]

    def __getitem__(self, step: int) -> list[int]:
        return self._epoch(step // self.per_epoch)[step % self.per_epoch]


def label_bucket(n: int) -> int:
    """Padded label length (the frame ladder, at least 8), so that label lengths compile a bounded number of
    times."""
    return ladder_frames(max(n, 1))


def make_batch(
    utterances: Sequence[Utterance],
    load: Callable[[str], np.ndarray],
    features: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
    labels: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    bucket: Callable[[int], int],
) -> dict[str, np.ndarray]:
    """The arrays of one batch: features padded to the frame bucket, labels to the label bucket."""
    feats, lengths = features([load(u.audio_filepath) for u in utterances])
    feats = np.asarray(feats)
    t = bucket(feats.shape[1])
    feats = np.pad(feats, ((0, 0), (0, t - feats.shape[1]), (0, 0)))
    ids, label_lengths = labels([u.text for u in utterances])
    ids = np.pad(ids, ((0, 0), (0, label_bucket(ids.shape[1]) - ids.shape[1])))
    return {"features": feats, "lengths": lengths, "labels": ids, "label_lengths": label_lengths}


def seconds(utterances: Sequence[Utterance]) -> float:
    return math.fsum(u.duration for u in utterances)
