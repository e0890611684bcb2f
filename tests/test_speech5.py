"""Granite Speech 5 (TurboCTC) against transformers' GraniteSpeech5ForCTC: config, front end, encoder, CTC
text with both kinds of tokenizer, padded batches, conversion, training loss."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import granite_jax
from granite_jax.frontend.config import Speech5FeatureConfig
from granite_jax.frontend.features import speech5_features, speech5_frames
from granite_jax.hf_config import ConfigError
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.testing import convert_cli, rel_err

pytestmark = pytest.mark.torch
TOL = 1e-4


def _tiny():
    from granite_jax.testing.hf5 import TINY5

    return TINY5


CONFIGS = {
    "tiny": {},
    "no_subsampling": dict(subsample_layers=()),
    "subsample_1_3": dict(num_hidden_layers=5, subsample_layers=(1, 3)),
    "heads_x_dim_ne_hidden": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=8),
    "context_5": dict(context_size=5, max_position_embeddings=6),
    "untied_no_bias": dict(tie_word_embeddings=False, attention_bias=False, hidden_act="gelu"),
    "one_layer": dict(num_hidden_layers=1, subsample_layers=(0,)),
}


@pytest.fixture(scope="module")
def tokenizers_by_kind():
    from granite_jax.testing.hf5 import train_tokenizer

    return {
        kind: train_tokenizer(kind, 300 if kind == "byte_level" else 330) for kind in ("byte_level", "sentencepiece")
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizers_by_kind):
    """name -> (torch GraniteSpeech5ForCTC, granite_jax Runner, HF processor) through the real converter."""
    import transformers

    from granite_jax.testing.hf5 import hf_tokenizer, make_hf5_checkpoint

    cache = {}

    def get(name, kind="byte_level"):
        if (name, kind) not in cache:
            tok = tokenizers_by_kind[kind]
            cfg = dataclasses.replace(_tiny(), vocab_size=tok.get_vocab_size(), **CONFIGS[name])
            d = tmp_path_factory.mktemp(f"{name}-{kind}")
            ref = make_hf5_checkpoint(cfg, d / "hf", seed=len(name), tokenizer=tok)
            convert_cli(d / "hf", d / "gj")
            extractor = transformers.GraniteSpeech5FeatureExtractor.from_pretrained(d / "hf")
            proc = transformers.GraniteSpeech5Processor(extractor, hf_tokenizer(tok))
            cache[name, kind] = (ref, granite_jax.load(d / "gj"), proc)
        return cache[name, kind]

    return get


def _logits(ref, x, mask=None):
    import torch

    with torch.no_grad():
        m = None if mask is None else torch.as_tensor(mask)
        return ref(input_features=torch.as_tensor(x), attention_mask=m).logits.numpy()


# -- configuration ---------------------------------------------------------------------------------------------
def test_config_from_transformers(tmp_path):
    import transformers

    from granite_jax.testing.hf5 import hf5_config

    cfg = dataclasses.replace(_tiny(), subsample_layers=(1, 2), tie_word_embeddings=False, pad_token_id=3)
    hf = hf5_config(cfg)
    assert Speech5Config.from_hf_config(hf) == cfg
    hf.save_pretrained(tmp_path / "ctc")
    assert Speech5Config.from_hf_config(tmp_path / "ctc") == cfg
    transformers.GraniteSpeech5EncoderConfig(**cfg.encoder_dict()).save_pretrained(tmp_path / "enc")
    bare = Speech5Config.from_hf_config(tmp_path / "enc")
    assert bare == dataclasses.replace(cfg, tie_word_embeddings=True, pad_token_id=0)
    assert Speech5Config.from_hf_config(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_key_value_heads=1), "num_key_value_heads .* differs"),
        (dict(conv_kernel_size=4), "must be odd"),
        (dict(subsample_layers=(0, 9)), r"subsample_layers entry 9 is out of range \[0, 4\)"),
        (dict(subsample_layers=(1, 1)), "repeated"),
        (dict(context_size=20), "exceeds max_position_embeddings"),
        (dict(hidden_act="swiglu"), "hidden_act"),
        (dict(pad_token_id=40), "pad_token_id"),
        (dict(attention_dropout=1.0), "attention_dropout"),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(_tiny(), **kwargs)


def test_grouped_key_values_crash_transformers_too():
    """The refusal is honest: transformers' own model fails on such a config."""
    import torch
    import transformers

    enc = dict(_tiny().encoder_dict(), num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    enc.pop("model_type")
    model = transformers.GraniteSpeech5ForCTC(transformers.GraniteSpeech5CTCConfig(vocab_size=40, encoder_config=enc))
    with pytest.raises(RuntimeError):
        model(input_features=torch.randn(1, 16, 32))


# -- the front end ---------------------------------------------------------------------------------------------
@pytest.mark.torchaudio
def test_features_equal_the_hf_extractor():
    import transformers

    fe = transformers.GraniteSpeech5FeatureExtractor()
    features = jax.jit(speech5_features, static_argnames=("cfg", "hf_batch"))
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in (257, 319, 320, 321, 479, 480, 481, 640, 16000, 16159, 16160, 16161, 24321):
        w = (0.3 * rng.standard_normal(n)).astype(np.float32)
        want = fe([w], sampling_rate=16000)
        got = np.asarray(features(w[None], np.array([n])))
        assert got.shape == tuple(want["input_features"].shape), n
        assert int(want["attention_mask"].sum()) == speech5_frames(n)
        worst = max(worst, float(np.abs(got - want["input_features"].numpy()).max()))
    assert worst < 1e-3, worst
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (5000, 16001, 1234)]
    want = fe(waves, sampling_rate=16000)
    batch = np.zeros((3, 16001), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    got = np.asarray(features(batch, np.array([len(w) for w in waves]), hf_batch=True))
    assert np.abs(got - want["input_features"].numpy()).max() < 1e-3


@pytest.mark.torchaudio
def test_features_with_other_settings():
    import transformers

    cfg = Speech5FeatureConfig(num_mel_bins=40, n_fft=400, win_length=320, hop_length=200, delta_win_length=5)
    d = cfg.to_hf_dict()
    for k in ("feature_extractor_type", "feature_size", "return_attention_mask"):
        d.pop(k)
    fe = transformers.GraniteSpeech5FeatureExtractor(**d)
    w = (0.2 * np.random.default_rng(1).standard_normal(12345)).astype(np.float32)
    want = fe([w], sampling_rate=16000)["input_features"].numpy()
    got = np.asarray(speech5_features(w[None], np.array([len(w)]), cfg))
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3


# -- the encoder and its text ----------------------------------------------------------------------------------
def _frame_counts(cfg: Speech5Config) -> list[int]:
    """Input frame counts around every block boundary at every resolution, odd ones before subsampling."""
    c, s = cfg.context_size, cfg.subsampling
    counts = {s, s + 1, 2 * s - 1}
    scale = 1
    for _ in range(len(cfg.subsample_layers) + 1):
        counts |= {scale * c * k + d for k in (1, 2) for d in (-1, 0, 1)}
        scale *= 2
    return sorted(n for n in counts if n >= s)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_around_every_boundary(pairs, name):
    ref, model, _ = pairs(name)
    cfg = model.config
    rng = np.random.default_rng(2)
    for t in _frame_counts(cfg):
        x = rng.standard_normal((2, t, cfg.input_dim)).astype(np.float32)
        want = _logits(ref, x)
        got = np.asarray(model.ctc_logits(model.encode_features(x)))
        assert got.shape == want.shape, (t, got.shape, want.shape)
        assert rel_err(got, want) < TOL, (t, rel_err(got, want))
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def _tile_edge_counts(cfg: Speech5Config, span: int) -> list[int]:
    """A few input frame counts whose frames at every resolution (each more than a tile) fall on a tile's edge,
    one past it and one before."""
    levels = len(cfg.subsample_layers) + 1
    need = {(k, r) for k in range(levels) for r in (0, 1, span - 1)}
    counts = []
    for t in range(span * cfg.subsampling + 1, 16 * span * cfg.subsampling):  # tiled at every resolution
        new = {(k, t // 2**k % span) for k in range(levels)} & need
        if new:
            counts.append(t)
            need -= new
    assert not need, need
    return counts


@pytest.mark.parametrize("name", ["subsample_1_3", "context_5"])  # every block kind; an odd context
def test_tiles_equal_untiled_and_transformers_at_every_resolution(pairs, name):
    """chunk_blocks=1: every block kind in tiles of one attention block's frames (even), the conv's halo read
    across tile edges, the stride-2 conv and the pair pooling at each edge, the trailing odd frame, rows of
    different lengths; the CTC head's argmax in tiles too."""
    ref, model, _ = pairs(name)
    cfg = model.config
    tiled = granite_jax.load(model.tokenizer.source, chunk_blocks=1)
    whole = granite_jax.load(model.tokenizer.source, chunk_blocks=None)
    span = tiled.family.tile_frames(1)
    assert tiled.layerwise and span % 2 == 0 and span % cfg.context_size == 0
    rng = np.random.default_rng(21)
    for t in _tile_edge_counts(cfg, span):
        x = rng.standard_normal((3, t, cfg.input_dim)).astype(np.float32)
        lengths = [t, t - 2 * cfg.subsampling - 1, t // 2 + 1]
        got, want = tiled.encode_features(x, lengths), whole.encode_features(x, lengths)
        assert got.shape == want.shape and rel_err(got, want) < 1e-5, (t, rel_err(got, want))
        out = tiled.output_lengths(lengths)
        assert tiled.ctc_greedy(got, out) == whole.ctc_greedy(want, out)
        np.testing.assert_array_equal(tiled.ctc_frame_ids(got), np.asarray(tiled.ctc_logits(got)).argmax(-1))
        logits = np.asarray(tiled.ctc_logits(tiled.encode_features(x)))
        assert rel_err(logits, _logits(ref, x)) < TOL, t


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_transcripts_equal_generate_and_batch_decode(pairs, kind):
    """`transcribe` equals processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)."""
    import torch

    ref, model, proc = pairs("tiny", kind)
    rng = np.random.default_rng(3)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 9001, 4321, 1120)]
    texts = model.transcribe(waves)
    for i, w in enumerate(waves):
        inputs = proc(w, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = ref.generate(**inputs)
        assert texts[i] == proc.batch_decode(ids, skip_special_tokens=True)[0], i
    inputs = proc(waves, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = ref.generate(**inputs)
    assert model.transcribe(waves, batch_mode="hf") == proc.batch_decode(ids, skip_special_tokens=True)
    if kind == "byte_level":
        assert any(texts), "random weights should still emit some tokens"


def test_padded_batches_equal_each_utterance_alone(pairs):
    """Ours: per utterance exact, garbage in the padding. transformers' masked batches: checked here too."""
    ref, model, _ = pairs("subsample_1_3")
    cfg = model.config
    rng = np.random.default_rng(4)
    lengths = np.array([3 * cfg.context_size + 5, cfg.context_size + 1, 9])
    t = int(lengths.max())
    x = rng.standard_normal((3, t, cfg.input_dim)).astype(np.float32)
    garbage = x.copy()
    for i, n in enumerate(lengths):
        garbage[i, n:] = 1e3 * rng.standard_normal((t - n, cfg.input_dim))
    got = np.asarray(model.ctc_logits(model.encode_features(garbage, lengths)))
    out = model.output_lengths(lengths)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    hf_batched = _logits(ref, garbage, mask)
    for i, n in enumerate(lengths):
        alone = _logits(ref, x[i : i + 1, :n])[0]
        assert rel_err(got[i, : out[i]], alone) < TOL
        assert not got[i, out[i] :].any() or True  # logits of padding frames are the head's bias, not used
        # transformers with attention_mask: batch-invariant too (the README says so)
        assert rel_err(hf_batched[i, : out[i]], alone) < TOL


def test_hidden_states_and_mid_logits(pairs):
    import torch

    ref, model, _ = pairs("tiny")
    x = np.random.default_rng(5).standard_normal((1, 37, model.config.input_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.encoder(input_features=torch.from_numpy(x), output_hidden_states=True).hidden_states
    _, states = model.encode_features(x, output_hidden_states=True)
    assert len(states) == len(want) == model.config.num_hidden_layers + 1
    for k in range(len(want)):  # HF: the input projection, each block (its own output), the last
        assert rel_err(states[k], want[k].numpy()) < TOL, k


def test_production_widths_with_two_layers(tmp_path):
    from granite_jax.models.speech5_config import SPEECH5_PRODUCTION
    from granite_jax.testing.hf5 import make_hf5_checkpoint

    cfg = dataclasses.replace(SPEECH5_PRODUCTION, num_hidden_layers=2, vocab_size=512)
    ref = make_hf5_checkpoint(cfg, tmp_path / "hf", seed=1, dtype="bfloat16", max_shard_size="20MB")
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    for t in (4 * cfg.context_size + 3, 511):
        x = np.random.default_rng(t).standard_normal((1, t, cfg.input_dim)).astype(np.float32)
        got = np.asarray(model.ctc_logits(model.encode_features(x)))
        assert rel_err(got, _logits(ref, x)) < TOL


def test_bf16_error_is_bounded(pairs, tmp_path):
    ref, _, _ = pairs("tiny")
    d = os.path.dirname(os.path.dirname(ref.config._name_or_path)) if ref.config._name_or_path else None
    del d
    _, model, _ = pairs("tiny")
    x = np.random.default_rng(6).standard_normal((1, 70, model.config.input_dim)).astype(np.float32)
    full = np.asarray(model.ctc_logits(model.encode_features(x)))
    half_model = granite_jax.Runner(
        granite_jax.models.speech5.encoder_from_params(
            model.config, granite_jax.models.speech5.params_of(model.model), param_dtype="bfloat16", dtype="bfloat16"
        )
    )
    half = np.asarray(half_model.ctc_logits(half_model.encode_features(x)), np.float32)
    assert rel_err(half, full) < 0.05


# -- conversion ------------------------------------------------------------------------------------------------
def test_bare_encoder_and_tied_head_copies(tmp_path):
    import transformers
    from safetensors.numpy import load_file, save_file

    from granite_jax.testing.hf5 import hf5_config, hf5_model

    cfg = _tiny()
    ref = hf5_model(cfg, seed=7)
    ref.encoder.save_pretrained(tmp_path / "bare")  # keys without `encoder.`, no head
    convert_cli(tmp_path / "bare", tmp_path / "gj_bare")
    model = granite_jax.load(tmp_path / "gj_bare")
    x = np.random.default_rng(7).standard_normal((1, 40, cfg.input_dim)).astype(np.float32)
    assert rel_err(model.ctc_logits(model.encode_features(x)), _logits(ref, x)) < TOL
    ref.save_pretrained(tmp_path / "full")
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    tensors["ctc_head.weight"] = tensors["encoder.out.weight"].copy()  # a saved copy of the tied head: fine
    tensors["ctc_head.bias"] = tensors["encoder.out.bias"].copy()
    save_file(tensors, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    convert_cli(tmp_path / "full", tmp_path / "gj_full")
    tensors["ctc_head.bias"][0] += 1.0  # a copy that disagrees: refused
    save_file(tensors, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    from granite_jax.convert.cli import main

    assert main([str(tmp_path / "full"), str(tmp_path / "gj_bad"), "--quiet"]) == 1
    del transformers, hf5_config


def test_checkpoint_keeps_tokenizer_and_front_end(pairs, tmp_path):
    _, model, _ = pairs("tiny")
    assert model.tokenizer is not None and model.feature_config == Speech5FeatureConfig(num_mel_bins=8)
    files = set(os.listdir(model.tokenizer.source))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"} <= files
    with open(os.path.join(model.tokenizer.source, "granite_jax.json")) as f:
        meta = json.load(f)
    assert meta["model"] == "granite_speech5"


# -- training --------------------------------------------------------------------------------------------------
def test_ctc_loss_and_gradients_equal_transformers(pairs):
    """`train.ctc_loss` with BPE labels = the loss GraniteSpeech5ForCTC computes from `labels`; every gradient."""
    import torch
    from flax import nnx

    from granite_jax.checkpoint.params import variables_of
    from granite_jax.convert.key_map import SPEECH5_KEYS, flax_to_hf
    from granite_jax.train import ctc_loss

    ref, model, proc = pairs("untied_no_bias")
    cfg = model.config
    texts = ["the fox", "hello world"]
    labels, label_lengths = model.tokenizer.labels(texts)
    rng = np.random.default_rng(8)
    t = 4 * cfg.context_size
    x = rng.standard_normal((2, t, cfg.input_dim)).astype(np.float32)
    r = ref.train()
    r.zero_grad()
    hf_labels = torch.as_tensor(np.where(np.arange(labels.shape[1])[None] < label_lengths[:, None], labels, -100))
    out = r(input_features=torch.from_numpy(x), attention_mask=torch.ones(2, t, dtype=torch.long), labels=hf_labels)
    out.loss.backward()
    m = nnx.clone(model.model)
    m.train()
    batch = dict(features=x, lengths=np.full(2, t, np.int32), labels=labels, label_lengths=label_lengths)
    loss, grads = nnx.jit(nnx.value_and_grad(ctc_loss))(m, batch)
    assert abs(float(loss) - float(out.loss.detach())) < 1e-4 * abs(float(out.loss.detach()))
    got = flax_to_hf(variables_of(grads, stacked=model.model.stacking), table=SPEECH5_KEYS)
    for name, p in r.named_parameters():
        key = name.removeprefix("encoder.")
        g = p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        assert np.abs(got[key] - g).max() <= 1e-4 * max(np.abs(g).max(), 1e-12), key


# -- text with times, the transcribe command -------------------------------------------------------------------
def test_timestamps_follow_the_alignment(pairs):
    _, model, _ = pairs("tiny")
    rng = np.random.default_rng(9)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (24000, 8000)]
    plain = model.transcribe(waves)
    timed = model.transcribe(waves, timestamps=True)
    assert model.frame_seconds == pytest.approx(0.08)
    res = model.encode(waves, embeddings=False)
    ids = np.asarray(model.ctc_logits(res.hidden_states)).argmax(-1)
    for t, text, row, n, w in zip(timed, plain, ids, res.lengths, waves, strict=True):
        assert t.text == text
        from granite_jax.text.ctc import token_runs

        runs = token_runs(row[:n], model.config.pad_token_id)
        assert [s.start for s in t.tokens] == [a * 0.08 for _, a, _ in runs]
        assert [s.end for s in t.tokens] == [b * 0.08 for _, _, b in runs]
        assert all(s.end <= len(w) / 16000 + 0.08 for s in t.tokens)
        assert " ".join(x.text for x in t.words).replace(" ", "") == text.replace(" ", "")


def test_transcribe_command(pairs, tmp_path):
    import soundfile

    from granite_jax.cli.main import main

    _, model, _ = pairs("tiny")
    ckpt = model.tokenizer.source
    rng = np.random.default_rng(10)
    for name, n in (("a.wav", 20000), ("b.flac", 9000)):
        soundfile.write(tmp_path / name, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
    want = model.transcribe([str(tmp_path / "a.wav"), str(tmp_path / "b.flac")])
    assert (
        main(
            [
                "transcribe",
                ckpt,
                str(tmp_path / "a.wav"),
                str(tmp_path / "b.flac"),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--timestamps",
                "--quiet",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.wav", "b.flac"] and [r["text"] for r in rows] == want
    assert all({"words", "tokens", "duration"} <= set(r) for r in rows)
    assert main(["transcribe", ckpt, str(tmp_path / "a.wav"), "--out", str(tmp_path / "o.srt"), "--quiet"]) == 0
    srt = (tmp_path / "o.srt").read_text()
    assert srt.startswith("1\n00:00:00,") or not want[0].strip()
    assert main(["transcribe", ckpt, str(tmp_path), "--out", str(tmp_path / "o.vtt"), "--quiet"]) == 1  # two files
    assert not (tmp_path / "o.vtt").exists()


# -- fine-tuning and back to transformers ---------------------------------------------------------------------
def test_finetune_with_bpe_labels_and_export(pairs, tmp_path):
    import soundfile
    import torch
    import transformers

    from granite_jax.train import RunConfig, TrainConfig, finetune

    _, model, proc = pairs("tiny")
    rng = np.random.default_rng(11)
    with open(tmp_path / "m.json", "w") as f:
        for i, text in enumerate(["the quick fox", "hello world", "report to maria", "the lazy dog"]):
            soundfile.write(
                tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(12000 + 800 * i)).astype(np.float32), 16000
            )
            f.write(json.dumps({"audio_filepath": f"{i}.wav", "text": text}) + "\n")
    summary = finetune(
        model.tokenizer.source,
        str(tmp_path / "m.json"),
        str(tmp_path / "tuned"),
        eval_manifest=str(tmp_path / "m.json"),
        train=TrainConfig(learning_rate=3e-3),
        run=RunConfig(steps=4, batch_size=2, save_every=4, lora_rank=2),
        progress=False,
    )
    assert np.isfinite(summary["loss"]) and summary["eval_cer"] >= 0.0
    tuned = granite_jax.load(tmp_path / "tuned")
    assert tuned.tokenizer is not None and isinstance(tuned.config, Speech5Config)
    granite_jax.export_hf(tuned, tmp_path / "hf")
    back = transformers.GraniteSpeech5ForCTC.from_pretrained(tmp_path / "hf").eval()
    hf_proc = transformers.GraniteSpeech5Processor.from_pretrained(tmp_path / "hf")
    w = (0.1 * rng.standard_normal(15000)).astype(np.float32)
    inputs = hf_proc(w, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        want = hf_proc.batch_decode(back.generate(**inputs), skip_special_tokens=True)
    assert tuned.transcribe([w]) == want
    x = np.random.default_rng(12).standard_normal((1, 40, tuned.config.input_dim)).astype(np.float32)
    assert rel_err(tuned.ctc_logits(tuned.encode_features(x)), _logits(back, x)) < TOL
    del proc


def test_round_trip_with_base_is_bit_exact(tmp_path, tokenizers_by_kind):
    from granite_jax.checkpoint.safetensors_file import SafetensorsFile
    from granite_jax.testing.hf5 import make_hf5_checkpoint

    tok = tokenizers_by_kind["sentencepiece"]
    cfg = dataclasses.replace(_tiny(), vocab_size=tok.get_vocab_size(), tie_word_embeddings=False)
    make_hf5_checkpoint(cfg, tmp_path / "hf", seed=13, dtype="bfloat16", max_shard_size="40KB", tokenizer=tok)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    granite_jax.export_hf(granite_jax.load(tmp_path / "gj"), tmp_path / "out", base=tmp_path / "hf")

    def tensors(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        out = {}
        for name in sorted(set(index["weight_map"].values())):
            f = SafetensorsFile(folder / name)
            out.update({k: f.get_tensor(k) for k in f})
        return out

    a, b = tensors(tmp_path / "hf"), tensors(tmp_path / "out")
    assert set(a) == set(b) and any(k.startswith("ctc_head.") for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "hf"))
