"""`granite-jax transcribe CKPT AUDIO_OR_DIR... [--out FILE.jsonl|.txt|.srt|.vtt] [--timestamps]`.

Files are sorted by duration and batched (similar lengths share a length bucket). The text: a 4.x checkpoint
with its language model generates it (`--prompt`, `--num-beams`, `--max-new-tokens`, `--speculative`);
Granite Speech 5 and bare 4.x encoders give greedy CTC (Speech 5: its tokenizer; 4.x: the character head),
where `--timestamps` adds every token's and word's start and end from the CTC alignment. Output is written
atomically: JSON lines (one object per file), tab-separated text, or subtitle cues (SRT / WebVTT, for one
audio file with CTC times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from granite_jax.checkpoint import atomic
from granite_jax.cli.common import run_command
from granite_jax.cli.encode import _batches, _duration, check_output, find_audio

SUFFIXES = (".jsonl", ".txt", ".srt", ".vtt")
CUE_WORDS = 7  # words per subtitle cue, at most
CUE_SECONDS = 3.5  # seconds per cue, at most


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="granite-jax transcribe")
    p.add_argument("checkpoint", help="granite_jax checkpoint or HF checkpoint directory")
    p.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files, or directories searched for them")
    p.add_argument("--out", help="output: .jsonl, .txt, .srt or .vtt (default: text on stdout)")
    p.add_argument("--timestamps", action="store_true", help="token and word times from the CTC alignment")
    p.add_argument("--batch-size", type=int, default=16, help="files per batch (similar lengths are batched)")
    p.add_argument("--max-batch-seconds", type=float, default=600.0, help="padded audio per batch, in seconds")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    g = p.add_argument_group("4.x checkpoints with their language model")
    g.add_argument("--prompt", default=None, help="the user turn after the audio (default: transcribe)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated per file, at most")
    g.add_argument("--speculative", action="store_true", help="greedy, verified against the CTC head's draft")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cues(words) -> list[tuple[float, float, str]]:
    """Words grouped into subtitle cues of at most CUE_WORDS words and CUE_SECONDS seconds."""
    out, cur = [], []
    for w in words:
        if cur and (len(cur) == CUE_WORDS or w.end - cur[0].start > CUE_SECONDS):
            out.append((cur[0].start, cur[-1].end, " ".join(x.text for x in cur)))
            cur = []
        cur.append(w)
    if cur:
        out.append((cur[0].start, cur[-1].end, " ".join(x.text for x in cur)))
    return out


def subtitles(words, vtt: bool) -> str:
    lines = ["WEBVTT", ""] if vtt else []
    for k, (a, b, text) in enumerate(cues(words), 1):
        sep = "." if vtt else ","
        if not vtt:
            lines.append(str(k))
        lines += [f"{_clock(a, sep)} --> {_clock(b, sep)}", text, ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import granite_jax
    from granite_jax.frontend.audio import load_audio
    from granite_jax.frontend.features import prepare_waveforms

    out = args.out
    if out is not None:
        check_output(out, args.overwrite, SUFFIXES)
    from granite_jax.runtime.generate import check_generate_args

    check_generate_args(args.max_new_tokens, args.num_beams, 1.0, False, args.speculative)
    if args.batch_size < 1 or not args.max_batch_seconds > 0:
        raise ValueError("--batch-size and --max-batch-seconds must be positive")
    files = find_audio(args.inputs)
    subtitle = out is not None and out.endswith((".srt", ".vtt"))
    if subtitle and len(files) != 1:
        raise ValueError(f"subtitle output ({out}) holds one audio file's cues; got {len(files)} files (use .jsonl)")
    timestamps = args.timestamps or subtitle
    model = granite_jax.load(args.checkpoint, dtype=args.dtype)
    generating = model.language_model is not None
    if generating and timestamps:
        raise ValueError(
            f"{'subtitle output (' + out + ')' if subtitle else '--timestamps'} needs CTC times, and this checkpoint's "
            "text comes from its language model, which has none: use .jsonl or .txt"
        )
    lm_options = dict(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, speculative=args.speculative or False
    )
    items = [(name, path, _duration(path)) for name, path in files]
    results: dict[str, dict] = {}
    audio_seconds, t0 = 0.0, time.perf_counter()
    bar = tqdm(total=len(items), unit="file", desc="transcribing", disable=args.quiet)
    sr = model.feature_config.sampling_rate
    for batch in _batches(items, args.batch_size, args.max_batch_seconds):
        names = [name for name, _, _ in batch]
        waves = prepare_waveforms(
            [load_audio(path, sr) for _, path, _ in batch], sr, model.feature_config, names, model.family.min_samples()
        )
        if generating:
            got = model.generate(waves, args.prompt, sampling_rate=sr, **lm_options).texts
        else:
            got = model.transcribe(waves, sr, timestamps=timestamps)
        for (name, _, _), w, r in zip(batch, waves, got, strict=True):
            seconds = len(w) / sr
            audio_seconds += seconds
            record = {"file": name, "duration": round(seconds, 3)}
            record.update(r.as_dict() if timestamps else {"text": r})
            results[name] = (record, r)
        bar.update(len(batch))
        bar.set_postfix(rtf=f"{(time.perf_counter() - t0) / max(audio_seconds, 1e-9):.3f}")
    bar.close()
    wall = time.perf_counter() - t0
    ordered = [results[name] for name, _ in files]
    if out is None:
        for record, _ in ordered:
            print(f"{record['file']}\t{record['text']}")
    else:
        with atomic.atomic_file(out, overwrite=args.overwrite) as tmp, open(tmp, "w", encoding="utf-8") as f:
            if out.endswith(".jsonl"):
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record, _ in ordered)
            elif out.endswith(".txt"):
                f.writelines(f"{record['file']}\t{record['text']}\n" for record, _ in ordered)
            else:
                f.write(subtitles(ordered[0][1].words, vtt=out.endswith(".vtt")))
    if not args.quiet:
        print(
            f"transcribed {len(items)} files, {audio_seconds:.1f} s of audio in {wall:.1f} s (real-time factor "
            f"{wall / max(audio_seconds, 1e-9):.3f}, {audio_seconds / wall:.1f}x real time, first batches include "
            f"compilation){' -> ' + os.path.abspath(out) if out else ''}",
            file=sys.stderr,
        )
    return 0


def execute(args: argparse.Namespace) -> int:
    return run_command("granite-jax transcribe", lambda: run(args))


def main(argv: list[str] | None = None) -> int:
    return execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
