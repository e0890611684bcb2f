"""CTC decoding on the host: greedy (collapse repeats, drop blank) from per-frame best ids, and the
alignment it implies (token and word times).

Every path from frame ids to text or tokens goes through `token_runs` once; what maps tokens to text
(`chr`, the tokenizer's `decode_tokens`) never collapses again, so a token repeated across a blank stays two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np


def token_runs(ids: Sequence[int] | np.ndarray, blank: int = 0) -> list[tuple[int, int, int]]:
    """The CTC collapse, the one every path uses: (id, first frame, last frame + 1) of each run of one
    non-blank id in one utterance's per-frame best ids. Two equal ids with a blank between them are two runs."""
    ids = np.asarray(ids).reshape(-1)
    if not len(ids):
        return []
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return [(int(ids[a]), int(a), int(b)) for a, b in zip(starts, ends, strict=True) if ids[a] != blank]


def collapse(ids: Sequence[int] | np.ndarray, blank: int = 0) -> list[int]:
    """One utterance's per-frame best ids -> the tokens greedy CTC emits (repeats merged, blank dropped)."""
    return [k for k, _, _ in token_runs(ids, blank)]


def ctc_greedy_ids(
    ids: np.ndarray | jax.Array, lengths: Sequence[int] | np.ndarray | None = None, *, blank: int = 0
) -> list[list[int]]:
    """Per row: the tokens of the first `lengths[i]` best ids (`collapse`)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (batch, frames), got shape {ids.shape}")
    b, t = ids.shape
    if lengths is None:
        lens = np.full(b, t)
    else:
        lens = np.asarray(lengths)
        if lens.shape != (b,) or not np.issubdtype(lens.dtype, np.integer):
            raise ValueError(f"lengths must be {b} integers (one per row of ids), got {lengths!r}")
        if b and (lens.min() < 0 or lens.max() > t):
            raise ValueError(f"lengths must lie in [0, {t}] (the frames of ids), got {lens.tolist()}")
    return [collapse(row[: int(n)], blank) for row, n in zip(ids, lens, strict=True)]


def ctc_greedy_decode(
    ids: np.ndarray | jax.Array,
    lengths: Sequence[int] | np.ndarray | None = None,
    *,
    id_to_text: Callable[[int], str] = chr,
    blank: int = 0,
) -> list[str]:
    """Greedy CTC text: per row, collapse repeated ids, drop `blank`, map the rest with `id_to_text`.

    `ids` (B, T) best ids per frame (argmax of `ctc_logits`); `lengths` valid frames per row.
    The Granite 4.x character heads map an id to `chr(id)`, the default.
    """
    return ["".join(id_to_text(i) for i in row) for row in ctc_greedy_ids(ids, lengths, blank=blank)]


@dataclass(frozen=True)
class Span:
    """A stretch of an utterance: `text`, and its `start` and `end` in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Transcript:
    """An utterance's greedy CTC text, its tokens and words with times from the CTC alignment."""

    text: str
    tokens: tuple[Span, ...] = ()
    words: tuple[Span, ...] = ()

    def as_dict(self) -> dict:
        spans = lambda xs: [{"text": s.text, "start": round(s.start, 3), "end": round(s.end, 3)} for s in xs]  # noqa: E731
        return {"text": self.text, "words": spans(self.words), "tokens": spans(self.tokens)}


def align(
    ids: Sequence[int],
    frame_seconds: float,
    text: Callable[[list[int]], str],
    token_text: Callable[[int], str],
    starts_word: Callable[[int, str], bool],
    blank: int = 0,
    shown: Callable[[int], bool] = lambda _: True,
) -> Transcript:
    """Text, tokens and words of one utterance's per-frame best ids, from one collapse (`token_runs`).

    `text` maps emitted tokens to text (no second collapse); `shown(id)` is False for the tokens that text
    leaves out (special tokens), which get no span. A token starts a word when `starts_word(id, text)` says so
    (the tokenizer's word-boundary marker; a space for character heads); a word's time is from its first
    token's start to its last token's end."""
    runs = token_runs(ids, blank)
    spans = [r for r in runs if shown(r[0])]
    tokens = tuple(Span(token_text(k), a * frame_seconds, b * frame_seconds) for k, a, b in spans)
    groups: list[list[tuple[int, int, int]]] = []
    for run in spans:
        if not groups or starts_word(run[0], token_text(run[0])):
            groups.append([])
        groups[-1].append(run)
    words = []
    for g in groups:
        word = text([k for k, _, _ in g]).strip()
        if word:
            words.append(Span(word, g[0][1] * frame_seconds, g[-1][2] * frame_seconds))
    return Transcript(text([k for k, _, _ in runs]), tokens, tuple(words))
