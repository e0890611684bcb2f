"""Log-mel features: parity with the real HF `GraniteSpeechFeatureExtractor` (torchaudio), batching, errors."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from granite_jax.frontend.config import FeatureConfig
from granite_jax.frontend.features import (
    extract_features,
    log_mel,
    mel_filterbank,
    min_samples,
    num_encoder_frames,
    prepare_waveforms,
)
from granite_jax.hf_config import ConfigError

SR = 16000
HOP = 160
TOL = 1e-3  # max |ours - HF| on the log-mel features (they lie in about [-1.5, 3])


@pytest.fixture(scope="module")
def hf():
    """The real HF extractor; parity tests skip where torchaudio (or transformers) is missing."""
    pytest.importorskip("torchaudio")
    transformers = pytest.importorskip("transformers")
    return transformers.GraniteSpeechFeatureExtractor()


def hf_features(hf, waves) -> np.ndarray:
    return hf(list(waves))["input_features"].numpy()


def tone(freq: float, amp: float = 0.5, n: int = 2 * SR) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def chirp(f0: float = 50.0, f1: float = 7950.0, n: int = 2 * SR) -> np.ndarray:
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * t[-1]) * t**2))).astype(np.float32)


def noise(n: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def clip(name: str) -> np.ndarray:
    pytest.importorskip("soundfile")
    from granite_jax.data import clip_path
    from granite_jax.frontend.audio import load_audio

    return load_audio(clip_path(name))


def max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


# -- configuration ------------------------------------------------------------------------------------------
def test_feature_config_defaults_and_validation():
    cfg = FeatureConfig()
    assert (cfg.sampling_rate, cfg.n_fft, cfg.win_length, cfg.hop_length, cfg.n_mels) == (16000, 512, 400, 160, 80)
    assert cfg.feature_dim == 160 and cfg.num_freqs == 257
    assert hash(cfg) == hash(FeatureConfig())  # static argument of jit
    with pytest.raises(ConfigError, match="hop_length must be a positive integer"):
        FeatureConfig(hop_length=0)
    with pytest.raises(ValueError, match="n_mels must be a positive integer"):
        FeatureConfig(n_mels=80.0)
    with pytest.raises(ConfigError, match=r"win_length \(600\) exceeds n_fft \(512\)"):
        FeatureConfig(win_length=600)


def test_feature_config_from_hf(tmp_path):
    saved = {
        "feature_extractor_type": "GraniteSpeechFeatureExtractor",
        "feature_size": 80,
        "melspec_kwargs": {"hop_length": 160, "n_fft": 512, "n_mels": 80, "sample_rate": 16000, "win_length": 400},
        "sampling_rate": 16000,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert FeatureConfig.from_hf(tmp_path) == FeatureConfig()
    assert FeatureConfig.from_hf(tmp_path / "preprocessor_config.json") == FeatureConfig()
    assert FeatureConfig.from_hf({"n_mels": 64, "hop_length": 320}) == FeatureConfig(n_mels=64, hop_length=320)
    with pytest.raises(ConfigError, match=r"melspec_kwargs\['n_mels'\] = 128 disagrees with n_mels = 80"):
        FeatureConfig.from_hf({**saved, "melspec_kwargs": {**saved["melspec_kwargs"], "n_mels": 128}})
    with pytest.raises(ConfigError, match="is not GraniteSpeechFeatureExtractor"):
        FeatureConfig.from_hf({"feature_extractor_type": "WhisperFeatureExtractor"})
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        FeatureConfig.from_hf(tmp_path / "missing")


def test_feature_config_from_hf_extractor_dict(hf):
    assert FeatureConfig.from_hf(hf.to_dict()) == FeatureConfig()


def test_mel_filterbank_matches_torchaudio(hf):
    fb = mel_filterbank()
    assert fb.shape == (257, 80) and fb.dtype == np.float32
    # torchaudio computes it in float32, we in float64 rounded once.
    np.testing.assert_allclose(fb, hf.mel_filters.mel_scale.fb.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        mel_filterbank(FeatureConfig(n_mels=40, sampling_rate=8000, n_fft=256, win_length=200, hop_length=80)),
        __import__("torchaudio").functional.melscale_fbanks(129, 0.0, 4000.0, 40, 8000).numpy(),
        rtol=0,
        atol=1e-5,
    )


def test_frame_counts():
    assert min_samples() == 257  # torch's reflect padding of n_fft // 2 = 256 needs more samples than that
    assert min_samples(FeatureConfig(hop_length=400)) == 400  # one encoder frame needs hop samples
    assert num_encoder_frames(257) == 1 and num_encoder_frames(16000) == 50 and num_encoder_frames(16160) == 51
    n = np.array([257, 319, 320, 16000, 16159, 16160, 16161])
    np.testing.assert_array_equal(num_encoder_frames(n), (n // HOP + 1) // 2)


# -- parity with HF, one utterance --------------------------------------------------------------------------
SIGNALS = {
    "noise": lambda: noise(3 * SR + 77),
    "loud_noise": lambda: np.random.default_rng(1).uniform(-1, 1, 2 * SR).astype(np.float32),
    "tone_50": lambda: tone(50.0),
    "tone_440": lambda: tone(440.0),
    "tone_3999.9": lambda: tone(3999.9),
    "tone_7999_near_nyquist": lambda: tone(7999.0),
    "tone_1000_quiet_1e-4": lambda: tone(1000.0, amp=1e-4),
    "tone_440_very_quiet_1e-6": lambda: tone(440.0, amp=1e-6),
    "chirp": lambda: chirp(),
    "silence": lambda: np.zeros(SR, np.float32),
    "impulse": lambda: np.eye(1, SR, 7000, dtype=np.float32)[0],
}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_parity_signals(hf, name):
    x = SIGNALS[name]()
    feats, lengths = extract_features(x)
    ref = hf_features(hf, [x])
    assert max_diff(feats, ref) <= TOL
    assert lengths.tolist() == [ref.shape[1]]


@pytest.mark.parametrize("name", ["fox", "numbers", "report"])
def test_parity_speech_clips(hf, name):
    x = clip(name)
    feats, lengths = extract_features(x)
    assert max_diff(feats, hf_features(hf, [x])) <= TOL
    assert lengths[0] == num_encoder_frames(len(x))


# Mel frames 1 + n // 160: 257 -> 2, 319 -> 2, 320 -> 3 (odd: last dropped), 16000 -> 101 (odd), 16160 -> 102.
@pytest.mark.parametrize(
    "n", [257, 258, 319, 320, 479, 16000, 16001, 16159, 16160, 16161, 2 * 16160 + 1, 3 * 16160 + 1]
)
def test_parity_lengths(hf, n):
    x = noise(n, seed=n)
    feats, lengths = extract_features(x)
    ref = hf_features(hf, [x])
    assert feats.shape == ref.shape == (1, (n // HOP + 1) // 2, 160)
    assert lengths.tolist() == [(n // HOP + 1) // 2]
    assert max_diff(feats, ref) <= TOL


# -- batches ------------------------------------------------------------------------------------------------
BATCH_LENGTHS = (16001, 257, 8160, 4321, 16159)


def batch_waves() -> list[np.ndarray]:
    return [noise(BATCH_LENGTHS[0]), tone(440.0, n=257), chirp(n=8160), tone(7999.0, 1e-3, n=4321), noise(16159, 5)]


def test_hf_batch_mode_equals_hf_on_the_list(hf):
    waves = batch_waves()
    feats, lengths = extract_features(waves, batch_mode="hf")
    out = hf(waves)
    assert max_diff(feats, out["input_features"].numpy()) <= TOL
    n = np.array(BATCH_LENGTHS)
    np.testing.assert_array_equal(lengths, (n // HOP + 1) // 2)
    # HF's audio_embed_sizes: the projector's output, ceil(encoder frames / window 15) blocks of 15 // 5 = 3.
    assert out["audio_embed_sizes"] == [math.ceil(t / 15) * 3 for t in lengths]


def test_per_utterance_rows_equal_each_utterance_alone(hf):
    waves = batch_waves()
    feats, lengths = extract_features(waves)
    feats = np.asarray(feats)
    assert feats.shape == (5, (max(BATCH_LENGTHS) // HOP + 1) // 2, 160)
    for i, x in enumerate(waves):
        ref = hf_features(hf, [x])[0]
        assert lengths[i] == ref.shape[0]
        assert max_diff(feats[i, : lengths[i]], ref) <= TOL
        assert np.all(feats[i, lengths[i] :] == 0.0)


def test_two_d_array_equals_hf_on_the_tensor(hf):
    x = np.stack([noise(16500, 1), chirp(n=16500)])
    feats, lengths = extract_features(x)
    assert max_diff(feats, hf(x)["input_features"].numpy()) <= TOL  # HF's collated-array path
    assert lengths.tolist() == [52, 52]


def test_hf_batch_on_a_longer_padded_array_equals_hf_on_the_list(hf):
    # What the compiled encode path does: pad further (to a bucket) and give the true lengths.
    waves = batch_waves()
    n = np.array(BATCH_LENGTHS, np.int32)
    batch = np.zeros((len(waves), 20000), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    ref = hf_features(hf, waves)
    t = ref.shape[1]
    out = np.asarray(jax.jit(log_mel, static_argnames=("cfg", "hf_batch"))(batch, n, hf_batch=True))
    assert max_diff(out[:, :t], ref) <= TOL
    assert np.all(out[:, t:] == 0.0)


@pytest.mark.parametrize("chunk", [7, 64, 333])
def test_chunked_log_mel_equals_unchunked(monkeypatch, chunk):
    """Long audio is framed chunk by chunk (bounded memory); the result does not change, in either mode."""
    from granite_jax.frontend import features

    waves = batch_waves()
    n = jnp.asarray(BATCH_LENGTHS, jnp.int32)
    batch = np.zeros((len(waves), 20000), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    for hf_batch in (False, True):
        want = np.asarray(log_mel(batch, n, hf_batch=hf_batch))
        monkeypatch.setattr(features, "MEL_CHUNK_FRAMES", chunk)
        got = np.asarray(log_mel(batch, n, hf_batch=hf_batch))
        monkeypatch.undo()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_log_mel_compiles_once_for_a_padded_shape():
    traces = []

    def f(w, n):
        traces.append(w.shape)
        return log_mel(w, n, FeatureConfig())

    jf = jax.jit(f)
    waves = [noise(20000, 1), chirp(n=20000), tone(300.0, n=20000)]
    batch = jnp.asarray(np.stack(waves))
    for lengths in ([20000, 300, 16001], [257, 20000, 8000], [16160, 16161, 19999]):
        out = np.asarray(jf(batch, jnp.asarray(lengths, jnp.int32)))
        for i, m in enumerate(lengths):
            alone, t = np.asarray(extract_features(waves[i][:m])[0][0]), num_encoder_frames(m)
            assert max_diff(out[i, :t], alone) <= 1e-5
            assert np.all(out[i, t:] == 0.0)
    assert len(traces) == 1


def test_inputs_jax_arrays_and_tuples():
    x = noise(16000)
    want = np.asarray(extract_features(x)[0])
    assert max_diff(extract_features(jnp.asarray(x))[0], want) == 0.0
    assert max_diff(extract_features((x.astype(np.float64),))[0], want) == 0.0


def test_resampled_input_equals_resampling_first():
    pytest.importorskip("soxr")
    from granite_jax.frontend.audio import resample

    x8 = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 8000)).astype(np.float32)
    feats, lengths = extract_features(x8, sampling_rate=8000)
    want, want_lengths = extract_features(resample(x8, 8000, SR))
    assert max_diff(feats, want) == 0.0 and lengths.tolist() == want_lengths.tolist() == [50]
    assert len(prepare_waveforms([x8], 8000)[0]) == 16000


# -- errors -------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="has 256 samples; the feature extractor needs at least 257"):
        extract_features(np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="waveform 1 has 100 samples"):
        extract_features([np.zeros(1000, np.float32), np.zeros(100, np.float32)])
    with pytest.raises(TypeError, match="dtype int16.*load_audio"):
        extract_features(np.zeros(1000, np.int16))
    with pytest.raises(TypeError, match="waveform 0 has dtype bool"):
        extract_features([np.zeros(1000, bool)])
    with pytest.raises(ValueError, match=r"shape \(1, 2, 1000\); expected 1-D \(one utterance\) or 2-D"):
        extract_features(np.zeros((1, 2, 1000), np.float32))
    with pytest.raises(ValueError, match=r"waveform 0 has shape \(2, 1000\): 2 channels; expected mono.*axis=0"):
        extract_features([np.zeros((2, 1000), np.float32)])
    with pytest.raises(ValueError, match=r"waveform 1 has shape \(1000, 2\): 2 channels.*axis=1"):
        extract_features([np.zeros(1000, np.float32), np.zeros((1000, 2), np.float32)])
    with pytest.raises(ValueError, match=r"\(48000, 2\), which looks like \(samples, channels\)"):
        extract_features(np.zeros((48000, 2), np.float32))
    with pytest.raises(ValueError, match="empty list"):
        extract_features([])
    with pytest.raises(ValueError, match="waveform is empty"):
        extract_features(np.zeros(0, np.float32))
    bad = np.zeros(1000, np.float32)
    bad[10] = np.nan
    with pytest.raises(ValueError, match="waveform 1 contains NaN or infinite"):
        extract_features([np.zeros(1000, np.float32), bad])
    with pytest.raises(ValueError, match="NaN or infinite samples"):
        extract_features(np.full(1000, 1e300))  # finite float64, inf as float32
    with pytest.raises(ValueError, match="batch_mode must be one of"):
        extract_features(np.zeros(1000, np.float32), batch_mode="padded")
    with pytest.raises(ValueError, match="sampling_rate must be a positive number"):
        extract_features(np.zeros(1000, np.float32), sampling_rate=0)
