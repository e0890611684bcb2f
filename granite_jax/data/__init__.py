"""Bundled speech clips (16 kHz mono FLAC made with espeak-ng by scripts/make_clips.py) for demos and tests."""

from __future__ import annotations

import importlib.resources

CLIPS: tuple[str, ...] = ("fox", "numbers", "report")


def clip_path(name: str) -> str:
    """Filesystem path of the bundled clip `name` (one of CLIPS), e.g. `load_audio(clip_path("fox"))`."""
    if name not in CLIPS:
        raise ValueError(f"no bundled clip {name!r}; choose one of {CLIPS}")
    path = importlib.resources.files(__name__) / "clips" / f"{name}.flac"
    if not path.is_file():
        raise FileNotFoundError(f"bundled clip {name!r} is missing at {path} (rerun scripts/make_clips.py)")
    return str(path)


__all__ = ["CLIPS", "clip_path"]
