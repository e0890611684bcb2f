"""`encode(waveforms)`: audio -> log-mel -> encoder -> projector in one call, against the whole HF pipeline
(GraniteSpeechFeatureExtractor with torchaudio, the encoder, `get_audio_features`); CTC head and decoder."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import granite_jax
from granite_jax.data import clip_path
from granite_jax.frontend.audio import load_audio, resample
from granite_jax.testing import TINY, convert_cli, rel_err
from granite_jax.text.ctc import ctc_greedy_decode

# input_dim 160 (the log-mel width); context 8 frames (0.16 s), so a 3 s clip spans ~20 blocks and the
# chunk_blocks=4 engages chunking; a plus variant so that the projector takes the wider input.
CFG = dataclasses.replace(TINY, input_dim=160, num_layers=3, conv_kernel_size=5)
PLUS = dataclasses.replace(CFG, cat_hidden_layers=(0, 2))
PROJECTOR = dict(num_hidden_layers=2, cross_attention_frequency=1, window_size=6, downsample_rate=3)
SR = 16000


def _noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _tone(n: int, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


@pytest.fixture(scope="module", params=["plain", "plus"])
def pair(request, tmp_path_factory):
    """(HF full model in fp32, granite_jax model converted from its checkpoint by the real CLI)."""
    from granite_jax.testing.hf import make_hf_full_checkpoint

    cfg = PLUS if request.param == "plus" else CFG
    d = tmp_path_factory.mktemp(f"encode-{request.param}")
    ref = make_hf_full_checkpoint(cfg, d / "hf", seed=7, projector=PROJECTOR)
    convert_cli(d / "hf", d / "gj")
    return ref, granite_jax.load(d / "gj", chunk_blocks=4)


@pytest.fixture(scope="module")
def extractor():
    pytest.importorskip("torchaudio")
    import transformers

    return transformers.GraniteSpeechFeatureExtractor(projector_window_size=6, projector_downsample_rate=3)


def _hf(ref, extractor, waves):
    """HF features, encoder hidden states, projector output and audio_embed_sizes for a list of waveforms."""
    import torch

    inputs = extractor(list(waves))
    with torch.no_grad():
        out = ref.model.get_audio_features(inputs["input_features"])
    return (
        inputs["input_features"].numpy(),
        out.last_hidden_state.numpy(),
        out.pooler_output.numpy(),
        list(inputs["audio_embed_sizes"]),
    )


WAVES = {
    "fox-clip": lambda: load_audio(clip_path("fox")),
    "noise-11111": lambda: _noise(11111, 1),
    "tone-16001": lambda: _tone(16001),
    "min-257": lambda: _noise(257, 2),
}


@pytest.mark.torch
def test_per_utterance_equals_hf_one_by_one(pair, extractor):
    """Each row of a mixed-length batch equals the HF pipeline run on that utterance alone."""
    ref, model = pair
    waves = [make() for make in WAVES.values()]
    res = model.encode(waves)
    assert len(res) == len(waves)
    for i, (name, w) in enumerate(zip(WAVES, waves, strict=True)):
        feats, hidden, pooled, sizes = _hf(ref, extractor, [w])
        n, e = res.lengths[i], res.embedding_counts[i]
        assert n == hidden.shape[1] and e == sizes[0], name
        assert np.abs(np.asarray(res.features[i, :n]) - feats[0]).max() < 1e-3, name
        assert rel_err(res.hidden_states[i, :n], hidden[0]) < 1e-3, name
        assert rel_err(res.audio_embeddings[i, :e], pooled[0, :e]) < 1e-3, name
        assert not np.asarray(res.hidden_states[i, n:]).any(), f"{name}: frames past the length are not zero"
        utt = res.utterance(i)
        assert utt["hidden_states"].shape[0] == n and utt["audio_embeddings"].shape[0] == e


@pytest.mark.torch
def test_hf_batch_mode_equals_hf_on_the_batch(pair, extractor):
    """batch_mode="hf" reproduces HF's extractor + encoder + projector on the zero-padded batch."""
    ref, model = pair
    waves = [WAVES["fox-clip"](), WAVES["tone-16001"](), WAVES["noise-11111"]()]
    feats, hidden, pooled, sizes = _hf(ref, extractor, waves)
    res = model.encode(waves, batch_mode="hf")
    assert res.hidden_states.shape[:2] == hidden.shape[:2]
    assert np.abs(np.asarray(res.features) - feats).max() < 1e-3
    assert rel_err(res.hidden_states, hidden) < 1e-3
    assert res.audio_embeddings.shape == pooled.shape
    assert rel_err(res.audio_embeddings, pooled) < 1e-3
    assert list(res.embedding_counts) == sizes
    # the modes differ on a padded batch (else this test could not tell them apart)
    per_utt = model.encode(waves)
    n = per_utt.lengths[1]
    assert rel_err(per_utt.hidden_states[1, :n], res.hidden_states[1, :n]) > 1e-3


@pytest.mark.torch
def test_encode_equals_encode_features_plus_projector(pair):
    """The one-call path equals its parts: extract_features -> encode_features -> audio_embeddings."""
    _, model = pair
    waves = [_noise(9000, 3), _tone(4000, 1000.0)]
    res = model.encode(waves)
    feats, lengths = granite_jax.extract_features(waves)
    hidden = model.encode_features(feats, lengths)
    emb, counts = model.audio_embeddings(hidden, lengths)
    np.testing.assert_array_equal(lengths, res.lengths)
    np.testing.assert_array_equal(counts, res.embedding_counts)
    assert rel_err(res.hidden_states, hidden) < 1e-5
    for i, e in enumerate(counts):
        assert rel_err(res.audio_embeddings[i, :e], emb[i, :e]) < 1e-5


@pytest.mark.torch
def test_audio_embeddings_match_hf_projector_and_ignore_padding(pair):
    import torch

    ref, model = pair
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 20, model.config.output_width)).astype(np.float32)
    with torch.no_grad():
        want = ref.model.projector(torch.from_numpy(h)).numpy()
    emb, counts = model.audio_embeddings(h)
    assert list(counts) == [8, 8]  # ceil(20 / 6) windows x (6 // 3) queries
    assert rel_err(emb, want) < 1e-4
    garbage = h.copy()
    garbage[1, 7:] = 1e3
    emb2, counts2 = model.audio_embeddings(garbage, lengths=[20, 7])
    h7 = h[1:2, :7]
    with torch.no_grad():
        alone = ref.model.projector(torch.from_numpy(h7)).numpy()[0]
    assert counts2[1] == alone.shape[0] == 4
    assert rel_err(emb2[1, : counts2[1]], alone) < 1e-4


@pytest.mark.torch
def test_ctc_head(pair):
    """ctc_logits is the reference's `out` on the final layer's hidden states (the last hidden_dim channels)."""
    import torch

    ref, model = pair
    res = model.encode([WAVES["fox-clip"]()], embeddings=False)
    assert res.audio_embeddings is None and res.embedding_counts is None
    final = np.array(res.hidden_states[..., -model.config.hidden_dim :])
    with torch.no_grad():
        want = ref.model.encoder.out(torch.from_numpy(final)).numpy()
    got = model.ctc_logits(res.hidden_states)
    assert got.shape == (*res.hidden_states.shape[:2], model.config.output_dim)
    assert rel_err(got, want) < 1e-5
    ids = want.argmax(-1)
    assert model.ctc_greedy(res.hidden_states, res.lengths) == ctc_greedy_decode(ids, res.lengths)


def test_ctc_greedy_decode():
    ids = np.array([[0, 72, 72, 0, 105, 105, 0, 0, 33, 33], [104, 0, 104, 104, 105, 0, 0, 0, 0, 0]])
    assert ctc_greedy_decode(ids) == ["Hi!", "hhi"]
    assert ctc_greedy_decode(ids, [3, 1]) == ["H", "h"]
    vocab = {72: "H", 105: "i", 33: "?", 104: "x"}
    assert ctc_greedy_decode(ids, id_to_text=vocab.__getitem__) == ["Hi?", "xxi"]
    with pytest.raises(ValueError, match="batch, frames"):
        ctc_greedy_decode(np.zeros(3, int))


@pytest.mark.torch
def test_resampled_input_and_2d_batch(pair):
    _, model = pair
    w8k = _tone(8000, 300.0)[: 8000 - 13]
    a = model.encode(w8k, sampling_rate=8000)
    b = model.encode(resample(w8k, 8000, SR))
    assert rel_err(a.hidden_states, b.hidden_states) < 1e-6
    two = np.stack([_noise(5000, 4), _noise(5000, 5)])
    c = model.encode(two)
    d = model.encode([two[1]])
    assert rel_err(c.hidden_states[1], d.hidden_states[0]) < 1e-5


@pytest.mark.torch
def test_waveform_lengths_compile_once_per_bucket(pair):
    _, model = pair
    rng = np.random.default_rng(9)
    lengths = rng.integers(300, 4 * SR, size=12)
    model.encode(_noise(int(lengths[0]), 0))
    before = model.num_compilations
    buckets = {model.bucket_frames(int((1 + n // 160) // 2)) for n in lengths}
    for n in lengths:
        model.encode(_noise(int(n), 1))
    assert model.num_compilations - before <= len(buckets)


@pytest.mark.torch
def test_encode_errors(pair):
    _, model = pair
    with pytest.raises(ValueError, match="at least 257"):
        model.encode(_noise(256, 0))
    with pytest.raises(TypeError, match="integer PCM"):
        model.encode(np.zeros(4000, np.int16))
    with pytest.raises(ValueError, match="batch_mode"):
        model.encode(_noise(4000, 0), batch_mode="padded")
    with pytest.raises(ValueError, match="NaN"):
        model.encode(np.full(4000, np.nan, np.float32))
    with pytest.raises(ValueError, match="hidden_states"):
        model.audio_embeddings(np.zeros((1, 5, 3), np.float32))


@pytest.mark.torch
def test_bare_encoder_has_no_projector(tmp_path):
    from granite_jax.testing.hf import make_hf_checkpoint

    make_hf_checkpoint(CFG, tmp_path / "hf")
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    res = model.encode(_noise(3000, 0))
    assert res.audio_embeddings is None and res.hidden_states.shape == (1, 9, CFG.hidden_dim)
    with pytest.raises(ValueError, match="no projector"):
        model.audio_embeddings(res.hidden_states)


def test_encode_needs_log_mel_width(tmp_path):
    from flax import nnx

    from granite_jax.models.conformer import GraniteSpeechEncoder
    from granite_jax.runtime.runner import Runner

    model = Runner(GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="input_dim=12"):
        model.encode(_noise(4000, 0))


@pytest.mark.torch
def test_bfloat16_encode_is_close_to_float32(tmp_path):
    """`load(dtype="bfloat16")`: log-mel in fp32, encoder and projector in bf16; close to the fp32 result."""
    from granite_jax.testing.hf import make_hf_full_checkpoint

    make_hf_full_checkpoint(CFG, tmp_path / "hf", seed=2, projector=PROJECTOR)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    wave = load_audio(clip_path("numbers"))
    full = granite_jax.load(tmp_path / "gj").encode(wave)
    half = granite_jax.load(tmp_path / "gj", dtype="bfloat16").encode(wave)
    assert half.hidden_states.dtype == half.audio_embeddings.dtype == jnp.bfloat16
    # the features are computed in fp32 and rounded to bf16 (8 bits of mantissa) for the encoder
    np.testing.assert_allclose(np.asarray(half.features, np.float32), np.asarray(full.features), atol=2e-2, rtol=0)
    errors = rel_err(half.hidden_states, full.hidden_states), rel_err(half.audio_embeddings, full.audio_embeddings)
    print(f"\nbf16 against fp32, relative error: hidden states {errors[0]:.2e}, audio embeddings {errors[1]:.2e}")
    assert max(errors) < 0.1


# -- what users pass ------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_mono_as_1_by_n_and_torch_tensors(pair):
    """(1, N) arrays in a list are mono (what HF's processor tests pass); torch tensors, bf16 included, work."""
    import torch

    _, model = pair
    waves = [_noise(5000, 4), _tone(7000)]
    want = model.encode(waves)
    for variant in (
        [w[None] for w in waves],
        [w[:, None] for w in waves],
        [torch.from_numpy(w) for w in waves],
        [torch.from_numpy(w)[None] for w in waves],
    ):
        got = model.encode(variant)
        np.testing.assert_array_equal(np.asarray(got.hidden_states), np.asarray(want.hidden_states))
    half = model.encode([torch.from_numpy(w).to(torch.bfloat16) for w in waves])
    rounded = model.encode([torch.from_numpy(w).to(torch.bfloat16).float().numpy() for w in waves])
    np.testing.assert_array_equal(np.asarray(half.hidden_states), np.asarray(rounded.hidden_states))
    feats = np.array(want.features)
    np.testing.assert_array_equal(
        np.asarray(model.encode_features(torch.from_numpy(feats), want.lengths)), np.asarray(want.hidden_states)
    )


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(2, 4000), (4000, 2), (3, 4000)])
def test_several_channels_are_refused_with_a_mixdown_hint(pair, shape):
    _, model = pair
    with pytest.raises(ValueError, match=r"waveform 1 has shape .*channels; expected mono.*mean\(axis="):
        model.encode([_noise(4000, 0), np.zeros(shape, np.float32)])


@pytest.mark.torch
def test_runner_extract_features_equals_the_function(pair):
    _, model = pair
    waves = [_noise(9000, 3), _tone(4000, 1000.0)]
    for mode in ("per_utterance", "hf"):
        got, lengths = model.extract_features(waves, batch_mode=mode)
        want, want_lengths = granite_jax.extract_features(waves, batch_mode=mode)
        np.testing.assert_array_equal(lengths, want_lengths)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.torch
def test_ctc_logits_and_extract_features_compile_per_bucket(pair):
    _, model = pair
    model.ctc_logits(model.encode_features(model.extract_features(_noise(4000, 0))[0]))
    before = model.num_traces
    for n in (4001, 4100, 4200):  # 12-13 frames: one bucket
        model.extract_features(_noise(n, 1))
        model.ctc_logits(model.encode_features(granite_jax.extract_features(_noise(n, 1))[0]))
    assert model.num_traces - before == 0
    assert model.num_compilations == model.num_traces  # the earlier name
    before = granite_jax.frontend.features._log_mel_jit._cache_size()
    for n in (4001, 4100, 4200):
        granite_jax.extract_features(_noise(n, 1))
    assert granite_jax.frontend.features._log_mel_jit._cache_size() - before <= 1


@pytest.mark.torch
@pytest.mark.parametrize("batch_mode", ["per_utterance", "hf"])
def test_checkpoint_feature_settings_are_honoured(tmp_path, batch_mode):
    """An HF directory whose preprocessor_config.json has other settings: converted, loaded and encoded
    with them, equal to the HF extractor that transformers builds from that file."""
    import json

    import torch
    import transformers

    pytest.importorskip("torchaudio")
    from granite_jax.testing.hf import make_hf_full_checkpoint

    cfg = dataclasses.replace(CFG, input_dim=128)  # 64 mels
    settings = dict(n_fft=400, win_length=320, hop_length=200, n_mels=64, sampling_rate=16000)
    ref = make_hf_full_checkpoint(cfg, tmp_path / "hf", seed=3, projector=PROJECTOR)
    hf_extractor = transformers.GraniteSpeechFeatureExtractor(
        **settings, projector_window_size=6, projector_downsample_rate=3
    )
    hf_extractor.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    saved.update(settings)  # transformers saves only melspec_kwargs, and reads back only these
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(saved))
    hf_extractor = transformers.GraniteSpeechFeatureExtractor.from_pretrained(tmp_path / "hf")
    assert hf_extractor.melspec_kwargs["hop_length"] == 200

    convert_cli(tmp_path / "hf", tmp_path / "gj")
    for source in ("gj", "hf"):  # our checkpoint, and the HF directory converted in memory
        model = granite_jax.load(tmp_path / source)
        assert model.feature_config == granite_jax.FeatureConfig(**settings)
        waves = [_noise(9000, 1), _tone(6100)]
        res = model.encode(waves, batch_mode=batch_mode)
        rows = [waves] if batch_mode == "hf" else [[w] for w in waves]
        for i, row in enumerate(rows):
            feats = hf_extractor(row)["input_features"]
            with torch.no_grad():
                hidden = ref.model.encoder(feats).last_hidden_state.numpy()
            got_f = np.asarray(res.features if batch_mode == "hf" else res.features[i : i + 1, : feats.shape[1]])
            assert got_f.shape == tuple(feats.shape)
            assert np.abs(got_f - feats.numpy()).max() < 1e-3
            got_h = res.hidden_states if batch_mode == "hf" else res.hidden_states[i : i + 1, : hidden.shape[1]]
            assert rel_err(got_h, hidden) < 1e-3


def test_load_checks_its_arguments_before_reading_weights(tmp_path, monkeypatch):
    from granite_jax.checkpoint import store as checkpoint
    from granite_jax.runtime import load as runner

    def no_read(*a, **k):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(checkpoint, "load", no_read)
    monkeypatch.setattr(runner, "convert_hf", no_read)
    (tmp_path / "granite_jax.json").write_text("{}")
    for kwargs, match in [
        (dict(dtype="int8"), "dtype must be a floating-point dtype"),
        (dict(dtype="nonsense"), "dtype must be a floating-point dtype"),
        (dict(devices=99), "devices=99"),
        (dict(buckets="fast"), "buckets must be"),
        (dict(chunk_blocks=0), "chunk_blocks"),
    ]:
        with pytest.raises(ValueError, match=match):
            granite_jax.load(tmp_path, **kwargs)
