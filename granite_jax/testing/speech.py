"""Synthetic speech made offline with espeak-ng: the bundled clips and a corpus of spoken digit strings.

`make_digit_corpus(dst)` writes WAV files and NeMo manifests (`train.json`, `eval.json`, and `heldout.json`
for a voice the training set never has): strings of 3 to 6 digits read as words ("four one nine") in
several voices, rates and noise levels. Needs `espeak-ng` on PATH (Debian: apt-get install espeak-ng).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import numpy as np

SAMPLING_RATE = 16000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m7", "en-gb+f4")
HELDOUT_VOICE = "en-sc+f2"  # Scottish English, female: only in heldout.json
RATES = (140, 155, 170, 185)
SNRS_DB = (None, 30.0, 20.0, 15.0)  # None: clean


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str = "en-us", wpm: int = 160) -> np.ndarray:
    """espeak-ng's speech for `text` as float32 samples at 16 kHz."""
    import soundfile as sf

    from granite_jax.frontend.audio import resample

    if not have_espeak():
        raise FileNotFoundError("espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "--stdout", text], check=True, capture_output=True)
    x, sr = sf.read(io.BytesIO(wav.stdout), dtype="float32")
    return resample(x, sr, SAMPLING_RATE)


def _utterance(rng: np.random.Generator, voice: str) -> tuple[str, np.ndarray]:
    text = " ".join(DIGITS[d] for d in rng.integers(0, 10, rng.integers(3, 7)))
    x = espeak(text, voice, int(rng.choice(RATES)))
    snr = SNRS_DB[rng.integers(len(SNRS_DB))]
    if snr is not None:
        power = float(np.mean(x**2)) or 1e-8
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
    pad = np.zeros(int(0.15 * SAMPLING_RATE), np.float32)  # a little silence around each utterance
    return text, np.concatenate([pad, x, pad]).clip(-1, 1).astype(np.float32)


def make_digit_corpus(
    dst: str | os.PathLike, n_train: int = 400, n_eval: int = 80, n_heldout: int = 40, seed: int = 0
) -> dict[str, str]:
    """Write the corpus under `dst` (wav/ and the manifests); return {split: manifest path}."""
    import soundfile as sf

    dst = os.fspath(dst)
    os.makedirs(os.path.join(dst, "wav"), exist_ok=True)
    rng = np.random.default_rng(seed)
    manifests = {}
    for split, n, voices in (
        ("train", n_train, VOICES),
        ("eval", n_eval, VOICES),
        ("heldout", n_heldout, (HELDOUT_VOICE,)),
    ):
        path = os.path.join(dst, f"{split}.json")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                text, x = _utterance(rng, voices[i % len(voices)])
                name = f"wav/{split}-{i:04d}.wav"
                sf.write(os.path.join(dst, name), x, SAMPLING_RATE, subtype="PCM_16")
                f.write(
                    json.dumps({"audio_filepath": name, "text": text, "duration": round(len(x) / SAMPLING_RATE, 3)})
                    + "\n"
                )
        manifests[split] = path
    return manifests
