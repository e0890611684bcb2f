"""`granite-jax encode CKPT AUDIO_OR_DIR... --out FILE`: audio files -> hidden states, embeddings or text.

Files are read lazily, sorted by duration and batched (similar lengths share a bucket, so padding and
recompiles stay low); the output (safetensors or npz, one entry per file and level) is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable

import numpy as np

from granite_jax.checkpoint import atomic
from granite_jax.cli.common import run_command

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")
LEVELS = ("hidden", "embeddings", "text")


def find_audio(inputs: Iterable[str]) -> list[tuple[str, str]]:
    """(name, path) of every audio file named or found (recursively) under a directory, sorted.

    A file's name is its path relative to the directory it was found in, or its basename.
    """
    found: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in os.walk(item):
                for f in files:
                    if f.lower().endswith(AUDIO_EXTENSIONS):
                        path = os.path.join(root, f)
                        found.append((os.path.relpath(path, item), path))
        elif os.path.isfile(item):
            found.append((os.path.basename(item), item))
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
    names = [n for n, _ in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several inputs share the name(s) {', '.join(dupes)}; pass their common directory instead")
    if not found:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {', '.join(inputs)}")
    return sorted(found)


def _duration(path: str) -> float:
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError
        raise ValueError(f"cannot read {path}: {e}") from None
    return info.frames / info.samplerate


def _batches(items: list[tuple[str, str, float]], batch_size: int, max_seconds: float) -> list[list]:
    """Consecutive runs of duration-sorted files: at most batch_size files and max_seconds of padded audio."""
    out, cur = [], []
    for item in sorted(items, key=lambda x: x[2]):
        if cur and (len(cur) == batch_size or item[2] * (len(cur) + 1) > max_seconds):
            out.append(cur)
            cur = []
        cur.append(item)
    if cur:
        out.append(cur)
    return out


def _write(
    path: str, arrays: dict[str, np.ndarray], texts: dict[str, str], meta: dict[str, str], overwrite: bool
) -> None:
    """Write atomically (temp file + rename): a failure or SIGTERM leaves no partial file."""
    import json

    with atomic.atomic_file(path, overwrite=overwrite) as tmp:
        if path.endswith(".npz"):
            extra = {f"{k}/text": np.array(v) for k, v in texts.items()}
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, **extra, __meta__=np.array(json.dumps(meta)))
        else:
            from safetensors.numpy import save_file

            md = dict(meta)
            md.update({f"{k}/text": v for k, v in texts.items()})
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=md)


def check_output(path: str, overwrite: bool, suffixes: tuple[str, ...]) -> None:
    """Everything about an output file that can be checked before the work starts."""
    if not path.endswith(suffixes):
        raise ValueError(f"--out must end in {' or '.join(suffixes)}, got {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a directory; give a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    atomic.check_writable_parent(path, "--out file")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="granite-jax encode")
    p.add_argument("checkpoint", help="granite_jax checkpoint (granite-jax-convert) or HF checkpoint directory")
    p.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files, or directories searched for them")
    p.add_argument("--out", required=True, help="output file: .safetensors or .npz (one entry per file and level)")
    p.add_argument(
        "--level",
        choices=LEVELS,
        action="append",
        help="what to write (repeatable): encoder hidden states, projector embeddings, CTC greedy text "
        "(default: embeddings when the checkpoint has a projector, else hidden)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="files per batch (similar lengths are batched)")
    p.add_argument("--max-batch-seconds", type=float, default=600.0, help="padded audio per batch, in seconds")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import granite_jax
    from granite_jax.frontend.audio import load_audio
    from granite_jax.frontend.features import prepare_waveforms

    out = args.out
    check_output(out, args.overwrite, (".safetensors", ".npz"))
    if args.batch_size < 1 or not args.max_batch_seconds > 0:
        raise ValueError("--batch-size and --max-batch-seconds must be positive")
    files = find_audio(args.inputs)
    model = granite_jax.load(args.checkpoint, dtype=args.dtype)
    levels = tuple(dict.fromkeys(args.level or ["embeddings" if model.projector is not None else "hidden"]))
    if "embeddings" in levels and model.projector is None:
        raise ValueError(f"{args.checkpoint} has no projector (a bare encoder): --level embeddings is not available")
    items = [(name, path, _duration(path)) for name, path in files]
    arrays: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    audio_seconds = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), unit="file", desc="encoding", disable=args.quiet)
    for batch in _batches(items, args.batch_size, args.max_batch_seconds):
        sr = model.feature_config.sampling_rate
        names = [name for name, _, _ in batch]
        waves = prepare_waveforms([load_audio(path, sr) for _, path, _ in batch], sr, model.feature_config, names)
        result = model.encode(waves, sr, embeddings="embeddings" in levels)
        texts_b = model.ctc_greedy(result.hidden_states, result.lengths) if "text" in levels else None
        for i, (name, _, _) in enumerate(batch):
            utt = result.utterance(i)
            if "hidden" in levels:
                arrays[f"{name}/hidden_states"] = utt["hidden_states"].astype(np.float32)
            if "embeddings" in levels:
                arrays[f"{name}/audio_embeddings"] = utt["audio_embeddings"].astype(np.float32)
            if texts_b is not None:
                texts[name] = texts_b[i]
            audio_seconds += len(waves[i]) / model.feature_config.sampling_rate
        bar.update(len(batch))
        bar.set_postfix(rtf=f"{(time.perf_counter() - t0) / max(audio_seconds, 1e-9):.3f}")
    bar.close()
    wall = time.perf_counter() - t0
    meta = {"checkpoint": os.path.abspath(args.checkpoint), "levels": ",".join(levels), "dtype": args.dtype}
    _write(out, arrays, texts, meta, args.overwrite)
    if not args.quiet:
        if "text" in levels:
            for name in sorted(texts):
                print(f"{name}\t{texts[name]}")
        print(
            f"encoded {len(items)} files, {audio_seconds:.1f} s of audio in {wall:.1f} s "
            f"(real-time factor {wall / audio_seconds:.3f}, {audio_seconds / wall:.1f}x real time, "
            f"first batches include compilation) -> {out}",
            file=sys.stderr,
        )
    return 0


def execute(args: argparse.Namespace) -> int:
    """`run`, with bad input reported as one line on stderr (exit status 1) and SIGTERM cleaned up after."""
    return run_command("granite-jax encode", lambda: run(args))


def main(argv: list[str] | None = None) -> int:
    return execute(build_parser().parse_args(argv))
