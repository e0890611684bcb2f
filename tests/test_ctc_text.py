"""Frame ids -> CTC text and tokens, collapsed exactly once on every path (a token repeated across a blank,
or across a special token, stays two), against transformers' `ParakeetTokenizer.batch_decode` and a plain
reference: hand-built paths, random paths (hypothesis), and a real model calibrated so that its greedy paths
hold such repeats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from granite_jax.text.ctc import collapse, ctc_greedy_decode, ctc_greedy_ids, token_runs

KINDS = ("byte_level", "sentencepiece")


def plain_collapse(path, blank=0):
    """The textbook greedy CTC rule, written independently of the library."""
    out, prev = [], None
    for i in path:
        if i != prev and i != blank:
            out.append(int(i))
        prev = i
    return out


def repeat_events(path, blank, special):
    """(token repeated across a blank run, token repeated across special tokens) in one frame path."""
    runs = [k for k, _ in __import__("itertools").groupby(int(i) for i in path)]
    across_blank = across_special = 0
    for a, mid, b in zip(runs, runs[1:], runs[2:], strict=False):
        if a == b and a != blank and a not in special:
            across_blank += mid == blank
            across_special += mid in special
    return across_blank, across_special


# -- the collapse itself (no torch) ----------------------------------------------------------------------------
HAND_PATHS = {
    "a_a": [5, 0, 5],
    "aa_a": [5, 5, 0, 5],
    "a_special_a": [5, 1, 5],
    "a_special_special_a": [5, 1, 1, 5],
    "runs_at_both_ends": [5, 5, 0, 6, 0, 0, 7, 7],
    "blank_ends": [0, 5, 0, 5, 0],
    "all_blank": [0, 0, 0, 0],
    "single_token": [5],
    "single_blank": [0],
    "empty": [],
    "no_blank_repeats": [5, 5, 5, 6, 6, 5],
}


@pytest.mark.parametrize("name", sorted(HAND_PATHS))
def test_collapse_matches_the_plain_rule(name):
    path = HAND_PATHS[name]
    assert collapse(path) == plain_collapse(path)
    assert [k for k, _, _ in token_runs(path)] == plain_collapse(path)
    assert ctc_greedy_ids(np.array([path + [0]], np.int64), [len(path)]) == [plain_collapse(path)]


def test_runs_keep_their_frames():
    assert token_runs([0, 5, 5, 0, 5, 6, 6, 0]) == [(5, 1, 3), (5, 4, 5), (6, 5, 7)]
    assert token_runs([3, 0, 3], blank=3) == [(0, 1, 2)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.integers(0, 4))
def test_collapse_property(path, blank):
    assert collapse(path, blank) == plain_collapse(path, blank)
    runs = token_runs(path, blank)
    assert all(path[a:b] == [k] * (b - a) for k, a, b in runs)  # each run is one id, in order, disjoint
    assert all(r[2] <= s[1] for r, s in zip(runs, runs[1:], strict=False))


# -- 4.x: character heads through the Runner --------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner4():
    """A 4.x Runner whose CTC head is an identity: hidden state one_hot(i) -> argmax i."""
    import jax.numpy as jnp
    from flax import nnx

    import granite_jax
    from granite_jax.models.conformer import GraniteSpeechEncoder
    from granite_jax.testing import TINY

    cfg = dataclasses.replace(TINY, output_dim=12)
    model = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0))
    model.out.kernel.set_value(jnp.eye(cfg.hidden_dim, cfg.output_dim))
    model.out.bias.set_value(jnp.zeros(cfg.output_dim))
    return granite_jax.Runner(model)


def test_4x_ctc_greedy_and_timestamps_collapse_once(runner4):
    paths = list(HAND_PATHS.values()) + [[1, 0, 1, 1, 0, 0, 1, 11, 0, 11, 11]]
    t = max(len(p) for p in paths)
    ids = np.zeros((len(paths), t), np.int64)
    for i, p in enumerate(paths):
        ids[i, : len(p)] = p
    lengths = np.array([len(p) for p in paths])
    hidden = np.eye(runner4.config.hidden_dim, dtype=np.float32)[ids]
    want = ["".join(chr(k) for k in plain_collapse(p)) for p in paths]
    assert runner4.ctc_greedy(hidden, lengths) == want
    assert runner4.ctc_decode(ids, lengths) == want
    assert ctc_greedy_decode(ids, lengths) == want
    for p, text in zip(paths, want, strict=True):
        tr = runner4.family.align(p)
        assert tr.text == text and "".join(s.text for s in tr.tokens) == text


# -- Speech 5: BPE tokenizers against transformers' ParakeetTokenizer -----------------------------------------------
@pytest.fixture(scope="module")
def tokenizers():
    pytest.importorskip("transformers")
    from granite_jax.testing.hf5 import hf_tokenizer, train_tokenizer
    from granite_jax.text.tokenizer import CTCTokenizer

    out = {}
    for kind in KINDS:
        tok = train_tokenizer(kind, 300 if kind == "byte_level" else 330)
        out[kind] = (CTCTokenizer(tok, blank_id=0), hf_tokenizer(tok))
    return out


def _word_ids(tok, text):
    return tok.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.torch
@pytest.mark.parametrize("kind", KINDS)
def test_hand_paths_against_parakeet(tokenizers, kind):
    ours, hf = tokenizers[kind]
    a, b = _word_ids(ours, "the")[0], _word_ids(ours, "fox")[0]
    paths = [[{5: a, 6: b, 7: b}.get(i, i) for i in p] for p in HAND_PATHS.values()]
    paths += [[a, 0, a, 0, a], [a, 1, a, 1, 1, a], [b, b, 0, b, 1, b, 0, 0], [a] * 6]
    assert ours.is_special(0) and ours.is_special(1) and not ours.is_special(a)
    want = hf.batch_decode(paths, skip_special_tokens=True)
    assert [ours.decode_frames(p) for p in paths] == want
    assert [ours.decode_tokens(collapse(p)) for p in paths] == want
    assert want[0] == want[2] == ours.decode_tokens([a, a]) != ours.decode_tokens([a])  # it used to lose one


@pytest.mark.torch
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_paths_against_parakeet(tokenizers, kind, data):
    """Random frame paths over a small alphabet (blank, <unk>, a few word pieces): text equals HF's, and the
    timestamps list exactly the tokens the text holds."""
    from granite_jax.text.ctc import align

    ours, hf = tokenizers[kind]
    alphabet = [0, 1, *_word_ids(ours, "the fox is"), *_word_ids(ours, "report")[:2]]
    path = data.draw(st.lists(st.sampled_from(alphabet), max_size=30))
    want = hf.batch_decode([path], skip_special_tokens=True)[0]
    assert ours.decode_frames(path) == want
    tr = align(
        path,
        0.08,
        ours.decode_tokens,
        ours.token,
        lambda k, _: ours.starts_word(k),
        ours.blank_id,
        shown=lambda k: not ours.is_special(k),
    )
    assert tr.text == want
    shown = [k for k in plain_collapse(path) if not ours.is_special(k)]
    assert [s.text for s in tr.tokens] == [ours.token(k) for k in shown]
    assert ours.decode_tokens(shown) == want


@pytest.mark.torch
def test_clean_up_follows_transformers_for_bpe(tmp_path, tokenizers):
    """A BPE tokenizer whose config asks for clean-up: transformers skips it (it corrupts BPE text)."""
    import json

    from granite_jax.text.tokenizer import CTCTokenizer

    ours, hf = tokenizers["byte_level"]
    ids = collapse([i for i in _word_ids(ours, "hello world , how are you ?")])
    for insist in (False, True):
        d = tmp_path / f"insist-{insist}"
        hf.save_pretrained(d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        config["clean_up_tokenization_spaces"] = True
        if insist:
            config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        import transformers

        want = transformers.ParakeetTokenizer.from_pretrained(d).batch_decode([ids], skip_special_tokens=True)[0]
        got = CTCTokenizer.from_dir(d).decode_tokens(ids)
        assert got == want and (" ," in got) != insist


# -- a real model whose greedy paths hold the repeats --------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_model_transcribes_like_transformers(tmp_path, tokenizers, kind, capsys):
    """GraniteSpeech5ForCTC with its CTC head narrowed to {blank, <unk>, a word piece}: its greedy paths
    repeat tokens across blanks and across <unk>. transcribe (text, tokens, words) and the CLI equal HF."""
    import json

    import soundfile
    import torch
    import transformers

    import granite_jax
    from granite_jax.cli.main import main
    from granite_jax.data import clip_path
    from granite_jax.testing import convert_cli
    from granite_jax.testing.hf5 import TINY5, hf_tokenizer, make_hf5_checkpoint

    ours, _ = tokenizers[kind]
    tok = ours.tokenizer
    cfg = dataclasses.replace(TINY5, vocab_size=tok.get_vocab_size(), tie_word_embeddings=False)
    ref = make_hf5_checkpoint(cfg, tmp_path / "hf", seed=3, tokenizer=tok)
    a = _word_ids(ours, "the")[0]
    keep = [0, 1, a]
    proc = transformers.GraniteSpeech5Processor(
        transformers.GraniteSpeech5FeatureExtractor.from_pretrained(tmp_path / "hf"), hf_tokenizer(tok)
    )
    speech = [granite_jax.load_audio(clip_path(c)) for c in ("fox", "numbers", "report")]
    # real speech (states that vary between frames), backwards too; lengths of every remainder
    waves = [
        speech[0],
        speech[1][:31000],
        speech[2],
        speech[1][-17000:],
        speech[0][::-1].copy(),
        speech[2][::-1][:40000].copy(),
    ]
    with torch.no_grad():  # the final states vary little between frames: score their standardised values
        inputs = [proc(x, sampling_rate=16000, return_tensors="pt") for x in waves]
        h = torch.cat([ref.encoder(**x).last_hidden_state[0] for x in inputs])
        mu, sigma = h.mean(0), h.std(0) + 1e-6
        g = torch.Generator().manual_seed(1)
        w = 12.0 * torch.randn(len(keep), h.shape[1], generator=g) / (sigma * h.shape[1] ** 0.5)
        ref.ctc_head.weight.zero_()
        ref.ctc_head.bias.fill_(-1e3)
        ref.ctc_head.weight[keep] = w
        ref.ctc_head.bias[keep] = -(w @ mu) + torch.tensor([0.0, 0.0, 0.0])
    ref.save_pretrained(tmp_path / "hf")
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    model = granite_jax.load(tmp_path / "gj")
    want, paths = [], []
    for wave in waves:  # one at a time: HF's own result for each utterance alone
        inputs = proc(wave, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = ref.generate(**inputs)
        want += proc.batch_decode(ids, skip_special_tokens=True)
        paths.append(ids[0].numpy())
    events = np.sum([repeat_events(p, 0, {1}) for p in paths], axis=0)
    with capsys.disabled():
        print(f"\n[{kind}] repeats across a blank: {events[0]}, across <unk>: {events[1]}")
    assert events[0] >= 3 and events[1] >= 3, events  # the calibration still yields the rare paths
    assert model.transcribe(waves) == want
    res = model.encode(waves, embeddings=False)
    got_ids = np.asarray(model.ctc_logits(res.hidden_states)).argmax(-1)
    for p, row, n in zip(paths, got_ids, res.lengths, strict=True):
        assert np.array_equal(row[:n], p[:n])
    timed = model.transcribe(waves, timestamps=True)
    for t, text, p in zip(timed, want, paths, strict=True):
        assert t.text == text
        shown = [k for k in plain_collapse(p) if k != 1]
        assert [s.text for s in t.tokens] == [ours.token(k) for k in shown]
        assert "".join(s.text for s in t.words).replace(" ", "") == text.replace(" ", "")
    files = []
    for i, wave in enumerate(waves):
        soundfile.write(tmp_path / f"{i}.wav", wave, 16000)
        files.append(str(tmp_path / f"{i}.wav"))
    for fmt in ("txt", "jsonl"):
        out = tmp_path / f"o.{fmt}"
        assert main(["transcribe", str(tmp_path / "gj"), *files, "--out", str(out), "--quiet", "--timestamps"]) == 0
        lines = out.read_text().splitlines()
        texts = [json.loads(x)["text"] if fmt == "jsonl" else x.split("\t", 1)[1] for x in lines]
        assert texts == want, fmt
