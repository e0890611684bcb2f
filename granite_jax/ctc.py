"""CTC decoding on the host: greedy (collapse repeats, drop blank) from per-frame best ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np


def ctc_greedy_ids(
    ids: np.ndarray | jax.Array, lengths: Sequence[int] | np.ndarray | None = None, *, blank: int = 0
) -> list[list[int]]:
    """Per row: the first `lengths[i]` best ids, repeats collapsed and `blank` dropped."""
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
    out = []
    for row, n in zip(ids, lens, strict=True):
        row = row[: int(n)]
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(i) for i in row[keep & (row != blank)]])
    return out


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
