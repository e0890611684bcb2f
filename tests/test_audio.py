"""Audio loading (soundfile) and resampling (soxr): formats, mixdown, rates, errors, the bundled clips."""

from __future__ import annotations

import io

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from granite_jax.data import CLIPS, clip_path  # noqa: E402
from granite_jax.frontend.audio import load_audio, resample  # noqa: E402

SR = 16000


def tone(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


def test_wav_int16_is_scaled_exactly(tmp_path):
    pcm = np.random.default_rng(0).integers(-32768, 32768, 4000, dtype=np.int16)
    sf.write(tmp_path / "a.wav", pcm, SR, subtype="PCM_16")
    x = load_audio(tmp_path / "a.wav")
    assert x.dtype == np.float32 and x.shape == (4000,)
    np.testing.assert_array_equal(x, pcm / np.float32(32768))
    assert x.min() >= -1.0 and x.max() < 1.0


def test_wav_int32_and_float(tmp_path):
    pcm = np.random.default_rng(1).integers(-(2**31), 2**31, 4000, dtype=np.int64).astype(np.int32)
    sf.write(tmp_path / "b.wav", pcm, SR, subtype="PCM_32")
    np.testing.assert_allclose(load_audio(str(tmp_path / "b.wav")), pcm / 2.0**31, rtol=0, atol=1e-7)
    x = np.random.default_rng(2).uniform(-1, 1, 4000).astype(np.float32)
    sf.write(tmp_path / "c.wav", x, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "c.wav"), x)


def test_flac_is_lossless(tmp_path):
    pcm = np.random.default_rng(3).integers(-32768, 32768, 5000, dtype=np.int16)
    sf.write(tmp_path / "a.flac", pcm, SR, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.flac"), pcm / np.float32(32768))


def test_ogg_vorbis_round_trip(tmp_path):
    x = tone(440.0, SR)
    sf.write(tmp_path / "a.ogg", x, SR, format="OGG", subtype="VORBIS")
    y = load_audio(tmp_path / "a.ogg")
    assert y.shape == x.shape
    assert np.sqrt(np.mean((y - x) ** 2)) < 0.02 * np.sqrt(np.mean(x**2))  # lossy codec
    assert abs(peak_hz(y, SR) - 440.0) <= 1.0


def test_stereo_mixdown_is_the_exact_mean(tmp_path):
    rng = np.random.default_rng(4)
    stereo = rng.uniform(-1, 1, (3000, 2)).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "s.wav"), stereo.astype(np.float64).mean(1).astype(np.float32))
    pcm = rng.integers(-32768, 32768, (3000, 3), dtype=np.int16)
    sf.write(tmp_path / "s3.wav", pcm, SR, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "s3.wav"), (pcm / 32768.0).mean(1).astype(np.float32))


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampled_to_16k(tmp_path, sr):
    n = int(1.3 * sr) + 7
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(n) / sr)).astype(np.float32)
    stereo = np.stack([x, x], axis=1)
    sf.write(tmp_path / "r.wav", stereo, sr, subtype="FLOAT")
    y = load_audio(tmp_path / "r.wav")
    assert y.dtype == np.float32 and y.shape == (round(n * SR / sr),)
    assert abs(peak_hz(y, SR) - 1000.0) <= SR / len(y)
    mid = y[len(y) // 4 : 3 * len(y) // 4]  # away from the filter's edges
    assert abs(np.sqrt(2 * np.mean(mid**2)) - 0.5) < 1e-3  # the amplitude is kept
    assert load_audio(tmp_path / "r.wav", sampling_rate=sr).shape == (n,)  # no resampling at the file's own rate


def test_resample_function():
    x = tone(300.0, 22050)
    assert resample(x, 22050, 22050) is x  # identity at equal rates (float32 in, same array out)
    y = resample(x.astype(np.float64), 22050, 16000)
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert abs(peak_hz(y, SR) - 300.0) <= 1.0
    assert resample(np.zeros((441, 2), np.float32), 44100, 16000).shape == (160, 2)
    with pytest.raises(TypeError, match="floating-point samples, got dtype int16"):
        resample(np.zeros(10, np.int16), 8000, 16000)
    with pytest.raises(ValueError, match="orig_sr must be a positive number"):
        resample(x, 0, 16000)
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3\)"):
        resample(np.zeros((1, 2, 3), np.float32), 8000, 16000)


def test_file_like_objects():
    x = tone(500.0, SR, 0.5)
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="FLOAT")
    buf.seek(0)
    np.testing.assert_array_equal(load_audio(buf), x)
    buf = io.BytesIO()
    sf.write(buf, x, 8000, format="FLAC", subtype="PCM_24")
    buf.seek(0)
    assert load_audio(buf).shape == (2 * len(x),)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found: .*nope.wav"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all " * 20)
    with pytest.raises(ValueError, match=r"cannot read audio from .*garbage.wav: .*Format not recognised"):
        load_audio(tmp_path / "garbage.wav")
    with pytest.raises(ValueError, match="cannot read audio from <BytesIO>"):
        load_audio(io.BytesIO(b"\x00" * 100))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="empty.wav holds no audio samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(IsADirectoryError):
        load_audio(tmp_path)


def test_bundled_clips():
    assert CLIPS == ("fox", "numbers", "report")
    for name in CLIPS:
        info = sf.info(clip_path(name))
        assert (info.samplerate, info.channels, info.format) == (SR, 1, "FLAC")
        assert 2.0 <= info.duration <= 5.0
        x = load_audio(clip_path(name))
        assert x.dtype == np.float32 and 0.1 < np.max(np.abs(x)) < 1.0
    with pytest.raises(ValueError, match="no bundled clip 'cat'"):
        clip_path("cat")
