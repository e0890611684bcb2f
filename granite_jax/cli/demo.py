"""`granite-jax demo`: a bundled clip through the whole path with a random checkpoint at the released
architecture, in JAX and in transformers' torch, with speed and parity (no downloads)."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time

import numpy as np

from granite_jax.testing.hf_llm import RELEASED_TEXT


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# A projector at the scale of the released models' (a 2-layer, 1024-wide Q-Former, cross-attention in every
# layer, windows of 15 frames -> 3 queries, into a 2048-wide LLM): an assumption for the demo's timings.
DEMO_PROJECTOR = dict(
    hidden_size=1024,
    num_hidden_layers=2,
    num_attention_heads=16,
    intermediate_size=4096,
    cross_attention_frequency=1,
    window_size=15,
    downsample_rate=5,
    llm_hidden_size=2048,
)


def _clip(name_or_path: str, seconds: float | None):
    from granite_jax.data import CLIPS, clip_path
    from granite_jax.frontend.audio import load_audio

    wave = load_audio(clip_path(name_or_path) if name_or_path in CLIPS else name_or_path)
    if seconds is not None:  # repeat (or cut) the clip to the requested length
        n = max(1, round(seconds * 16000))
        wave = np.tile(wave, -(-n // len(wave)))[:n]
    return wave


# The demo's language model: the released models' width (hidden 2048, 16 heads / 4 kv heads, SwiGLU 8192,
# Granite's multipliers), 2 layers and a small vocabulary trained here, so that it builds in seconds.
DEMO_TEXT = dict(
    {k: v for k, v in RELEASED_TEXT.items() if k not in ("hidden_size", "max_position_embeddings", "vocab_size")},
    num_hidden_layers=2,
)
DEMO_NEW_TOKENS = 24


def demo(layers: int, clip: str, seconds: float | None, runs: int, batch: int) -> int:
    """Bundled speech clip -> log-mel -> encoder -> projector -> language model, in JAX and in HF torch;
    parity and speed."""
    import jax

    import granite_jax
    from granite_jax.convert.convert import convert_checkpoint
    from granite_jax.models.conformer_config import PRODUCTION
    from granite_jax.testing.hf import require_torch
    from granite_jax.testing.hf_llm import hf_generate, make_hf_speech_checkpoint, train_llm_tokenizer

    try:
        torch, transformers = require_torch()
    except ImportError as e:
        print(f"granite-jax demo compares against the torch reference: {e}", file=sys.stderr)
        return 1
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar would interleave here
    cfg = dataclasses.replace(PRODUCTION, num_layers=layers)
    wave = _clip(clip, seconds)
    waves = [wave] * batch
    audio = batch * len(wave) / 16000
    print(
        f"granite-jax demo: {cfg.num_layers} layers x {cfg.hidden_dim}, {cfg.num_heads} heads x {cfg.dim_head}, "
        f"context {cfg.context_size}, Q-Former projector {DEMO_PROJECTOR['num_hidden_layers']} x "
        f"{DEMO_PROJECTOR['hidden_size']}; {batch} x {len(wave) / 16000:.2f} s of speech ({clip}); "
        f"jax on {jax.default_backend()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tokenizer = train_llm_tokenizer(1000)
        ref, processor = make_hf_speech_checkpoint(
            cfg, f"{tmp}/hf", tokenizer, seed=0, projector=DEMO_PROJECTOR, text=DEMO_TEXT, tie=False
        )
        print(f"[1/5] made a random HF GraniteSpeechForConditionalGeneration with transformers ({_since(t0)})")
        t0 = time.perf_counter()
        convert_checkpoint(f"{tmp}/hf", f"{tmp}/gj")
        print(f"[2/5] converted encoder, projector and language model with granite-jax-convert ({_since(t0)})")
        model = granite_jax.load(f"{tmp}/gj")

        def run_jax():
            r = model.encode(waves)
            jax.block_until_ready((r.hidden_states, r.audio_embeddings))
            return r

        t0 = time.perf_counter()
        res = run_jax()
        first = time.perf_counter() - t0
        jax_times = _timed(run_jax, runs)
        print(f"[3/5] granite_jax encode(waveforms): first call (compile + run) {first:.2f} s")
        try:
            extractor = transformers.GraniteSpeechFeatureExtractor()
        except ImportError:  # torchaudio missing: HF's side starts from our features instead
            extractor = None

        def run_torch():
            feats = extractor(waves)["input_features"] if extractor else torch.from_numpy(np.asarray(res.features))
            return feats, ref.model.get_audio_features(feats)

        with torch.inference_mode():
            feats, out = run_torch()
            torch_times = _timed(run_torch, runs)
        print(f"[4/5] HF torch reference done{'' if extractor else ' (no torchaudio: fed our log-mel to HF)'}")
        t0 = time.perf_counter()
        gen = model.generate(waves[:1], max_new_tokens=DEMO_NEW_TOKENS)
        t_jax_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        want = hf_generate(ref, processor, waves[0], max_new_tokens=DEMO_NEW_TOKENS) if extractor else None
        t_hf_gen = time.perf_counter() - t0
        print(
            f"[5/5] speech to text: granite_jax generate {t_jax_gen:.2f} s (first call), HF generate {t_hf_gen:.2f} s"
        )
    n, e = int(res.lengths[0]), int(res.embedding_counts[0])
    errs = {
        "log-mel features (max abs)": float(np.abs(np.asarray(res.features[0, :n]) - feats[0].numpy()).max()),
        "encoder hidden states": _rel(res.hidden_states[0, :n], out.last_hidden_state[0].numpy()),
        "projector embeddings": _rel(res.audio_embeddings[0, :e], out.pooler_output[0, :e].numpy()),
    }
    tj, tt = statistics.median(jax_times), statistics.median(torch_times)
    print()
    print("| side | median s | real-time factor |")
    print("|---|---|---|")
    print(f"| HF torch (extractor + encoder + projector) | {tt:.3f} | {tt / audio:.4f} |")
    print(f"| granite_jax encode | {tj:.3f} | {tj / audio:.4f} |")
    print(f"\nspeed-up {tt / tj:.2f}x; {e} projector embeddings of width {res.audio_embeddings.shape[-1]}")
    print("parity (fp32), max|jax - torch| / max|torch| unless noted:")
    for k, v in errs.items():
        print(f"  {k}: {v:.2e}")
    text = model.ctc_greedy(res.hidden_states[:1], res.lengths[:1])[0]
    print(f"CTC greedy text ({len(text)} chars; random weights, so not words): {text[:40]!r}")
    ids = gen.token_ids[0].tolist()
    if want is not None:
        print(f"generated token ids equal HF generate's: {ids == want} ({len(ids)} tokens)")
    print(f"generated text (random weights, so not words): {gen.texts[0][:60]!r}")
    ok = errs["log-mel features (max abs)"] < 1e-3 and max(list(errs.values())[1:]) < 1e-3
    return 0 if ok and (want is None or ids == want) else 2


def random_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained here on random words (no downloads)."""
    from granite_jax.testing.hf5 import train_tokenizer

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(60000)]
    return train_tokenizer("byte_level", vocab_size, [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)])


def demo5(layers: int, clip: str, seconds: float | None, runs: int, batch: int) -> int:
    """Granite Speech 5 (TurboCTC): clip -> features -> encoder -> CTC text, in JAX and in HF torch."""
    import jax

    import granite_jax
    from granite_jax.convert.convert import convert_checkpoint
    from granite_jax.models.speech5_config import SPEECH5_PRODUCTION
    from granite_jax.testing.hf import require_torch
    from granite_jax.testing.hf5 import hf_tokenizer, make_hf5_checkpoint

    try:
        torch, transformers = require_torch()
    except ImportError as e:
        print(f"granite-jax demo compares against the torch reference: {e}", file=sys.stderr)
        return 1
    transformers.utils.logging.disable_progress_bar()
    # A shallower demo keeps the subsampling blocks that still exist at that depth.
    keep = tuple(i for i in SPEECH5_PRODUCTION.subsample_layers if i < layers)
    cfg = dataclasses.replace(SPEECH5_PRODUCTION, num_hidden_layers=layers, subsample_layers=keep)
    wave = _clip(clip, seconds)
    waves = [wave] * batch
    audio = batch * len(wave) / 16000
    print(
        f"granite-jax demo --model speech5: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads x {cfg.head_dim}, context {cfg.context_size}, subsampling x{cfg.subsampling} "
        f"(blocks {list(cfg.subsample_layers)}), vocabulary {cfg.vocab_size}; {batch} x {len(wave) / 16000:.2f} s of "
        f"speech ({clip}); jax on {jax.default_backend()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = random_tokenizer(cfg.vocab_size)
        ref = make_hf5_checkpoint(cfg, f"{tmp}/hf", seed=0, tokenizer=tok)
        print(f"[1/4] made a random HF GraniteSpeech5ForCTC and a {cfg.vocab_size}-token BPE tokenizer ({_since(t0)})")
        t0 = time.perf_counter()
        convert_checkpoint(f"{tmp}/hf", f"{tmp}/gj")
        print(f"[2/4] converted it with granite-jax-convert ({_since(t0)})")
        model = granite_jax.load(f"{tmp}/gj")
        t0 = time.perf_counter()
        texts = model.transcribe(waves)
        first = time.perf_counter() - t0
        jax_times = _timed(lambda: model.transcribe(waves), runs)
        print(f"[3/4] granite_jax transcribe(waveforms): first call (compile + run) {first:.2f} s")
        proc = transformers.GraniteSpeech5Processor(
            transformers.GraniteSpeech5FeatureExtractor.from_pretrained(f"{tmp}/hf"), hf_tokenizer(tok)
        )

        def run_torch():
            inputs = proc(waves, sampling_rate=16000, return_tensors="pt")
            return inputs, proc.batch_decode(ref.generate(**inputs), skip_special_tokens=True)

        with torch.inference_mode():
            inputs, want = run_torch()
            torch_times = _timed(run_torch, runs)
            logits = ref(**inputs).logits.numpy()
        print("[4/4] HF torch reference done")
        feats, _ = model.extract_features(waves)
        res = model.encode(waves, embeddings=False)
        n = int(res.lengths[0])
        errs = {
            "features (max abs)": float(np.abs(np.asarray(feats) - inputs["input_features"].numpy()).max()),
            "CTC logits": _rel(np.asarray(model.ctc_logits(res.hidden_states))[0, :n], logits[0, :n]),
        }
    tj, tt = statistics.median(jax_times), statistics.median(torch_times)
    print()
    print("| side | median s | real-time factor |")
    print("|---|---|---|")
    print(f"| HF torch (extractor + generate + batch_decode) | {tt:.3f} | {tt / audio:.4f} |")
    print(f"| granite_jax transcribe | {tj:.3f} | {tj / audio:.4f} |")
    print(f"\nspeed-up {tt / tj:.2f}x; {n} output frames of 80 ms")
    print("parity (fp32), max|jax - torch| / max|torch| unless noted:")
    for k, v in errs.items():
        print(f"  {k}: {v:.2e}")
    same = texts == want
    print(f"transcripts identical to HF's: {same} (random weights and tokenizer, so not words): {texts[0][:40]!r}")
    return 0 if same and errs["features (max abs)"] < 1e-3 and errs["CTC logits"] < 1e-3 else 2


def _since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())
