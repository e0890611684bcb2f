"""Regenerate the bundled speech clips (granite_jax/data/clips/*.flac) offline with espeak-ng.

espeak-ng writes 22.05 kHz 16-bit WAV to stdout; it is resampled to 16 kHz with soxr
(granite_jax.frontend.audio.resample)
and stored as 16-bit mono FLAC, rounded without dither, so the output depends only on espeak-ng's version.
Usage: python scripts/make_clips.py [--out DIR]   (needs espeak-ng on PATH, soundfile and soxr)
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

import numpy as np

# name -> (espeak-ng voice, words per minute, text). Keep in sync with granite_jax.data.CLIPS.
CLIPS = {
    "fox": ("en-us", 160, "The quick brown fox jumps over the lazy dog."),
    "numbers": ("en-gb+f3", 165, "Flight 237 leaves gate 18 at 9:45."),
    "report": ("en-us+m3", 185, "Please send the quarterly report to Maria before Friday afternoon."),
}
SAMPLING_RATE = 16000
OUT = pathlib.Path(__file__).resolve().parent.parent / "granite_jax" / "data" / "clips"


def synthesize(voice: str, speed: int, text: str) -> np.ndarray:
    """espeak-ng -> int16 mono samples at SAMPLING_RATE."""
    from granite_jax.testing.speech import espeak

    y = espeak(text, voice, speed)
    return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help=f"output directory (default {OUT})")
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("make_clips: espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng)", file=sys.stderr)
        return 1
    import soundfile as sf

    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.strip()
    print(version)
    for name, (voice, speed, text) in CLIPS.items():
        pcm = synthesize(voice, speed, text)
        path = args.out / f"{name}.flac"
        sf.write(path, pcm, SAMPLING_RATE, format="FLAC", subtype="PCM_16")
        seconds, kib = len(pcm) / SAMPLING_RATE, path.stat().st_size / 1024
        print(f"{path.name}: {seconds:.2f} s, {kib:.0f} KiB, {voice} at {speed} wpm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
