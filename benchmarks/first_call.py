"""What the first `encode` of a clip costs in a new process, beside HF torch's first call on the same clip.

One random HF Granite Speech checkpoint (production encoder, a 2-layer 1024-wide Q-Former projector, fp32)
is made with transformers and converted once. For each length, every measurement runs in a fresh process:
torch (HF feature extractor + `get_audio_features`), then granite_jax `encode(waveform)` twice with one
persistent compilation cache directory (`enable_compilation_cache`): first with the cache empty (tracing +
XLA compilation), then with it warm (what every later process pays). Each side: the first call's wall
time, then the median of steady calls. Usage:

    python benchmarks/first_call.py                       # 3.2 and 10 s; about 4 min on 2 cores
    python benchmarks/first_call.py --seconds 3.2 30 --runs 5 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import exit_on_sigterm

SR = 16000


def wave_of(seconds: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)


def child(side: str, path: str, seconds: float, runs: int, cache: str | None) -> dict:
    """One side's load time, first call and steady median on `seconds` of audio, in this process."""
    wave = wave_of(seconds)
    t0 = time.perf_counter()
    if side == "torch":
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        model = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(path).eval()
        extractor = transformers.GraniteSpeechFeatureExtractor()

        def call() -> None:
            with torch.inference_mode():
                model.model.get_audio_features(extractor([wave])["input_features"])

    else:
        import jax

        import granite_jax

        events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda e, s, **_: events.append(s) if e.endswith("backend_compile_duration") else None
        )
        granite_jax.enable_compilation_cache(cache)
        model = granite_jax.load(path)
        jax.block_until_ready(model.parameters())

        def call() -> None:
            jax.block_until_ready(model.encode(wave).audio_embeddings)

    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    steady = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        steady.append(time.perf_counter() - t0)
    out = {"load_s": load, "first_s": first, "steady_s": float(np.median(steady))}
    if side == "jax":
        out["xla_compile_s"] = sum(events)
    return out


def run_child(side: str, path: str, seconds: float, runs: int, cache: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--path", path, "--seconds", str(seconds)]
    cmd += ["--runs", str(runs)] + (["--cache", cache] if cache else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[3.2, 10])
    p.add_argument("--runs", type=int, default=3, help="steady calls after the first (median)")
    p.add_argument("--layers", type=int, default=None, help="encoder depth (default: production, 16)")
    p.add_argument("--child", choices=("torch", "jax"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.seconds[0], args.runs, args.cache)), flush=True)
        return

    import dataclasses

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_encoder import cpu_model

    from granite_jax.cli.demo import DEMO_PROJECTOR
    from granite_jax.convert.convert import convert_checkpoint
    from granite_jax.models.conformer_config import PRODUCTION
    from granite_jax.testing.hf import make_hf_full_checkpoint

    cfg = PRODUCTION if args.layers is None else dataclasses.replace(PRODUCTION, num_layers=args.layers)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; encoder {cfg.num_layers} x {cfg.hidden_dim} + projector, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        make_hf_full_checkpoint(cfg, f"{tmp}/hf", seed=0, projector=DEMO_PROJECTOR)
        convert_checkpoint(f"{tmp}/hf", f"{tmp}/gj")
        print(
            "\n| audio s | torch first s | torch steady s | jax first s, empty cache (XLA compile s) "
            "| jax first s, warm cache | jax steady s | first call torch/jax (warm cache) |\n"
            "|---|---|---|---|---|---|---|"
        )
        for seconds in args.seconds:
            t = run_child("torch", f"{tmp}/hf", seconds, args.runs)
            cache = tempfile.mkdtemp(dir=tmp)
            cold = run_child("jax", f"{tmp}/gj", seconds, args.runs, cache)
            warm = run_child("jax", f"{tmp}/gj", seconds, args.runs, cache)
            print(
                f"| {seconds:g} | {t['first_s']:.3f} | {t['steady_s']:.3f} | {cold['first_s']:.3f} "
                f"({cold['xla_compile_s']:.2f}) | {warm['first_s']:.3f} | {warm['steady_s']:.3f} "
                f"| {t['first_s'] / warm['first_s']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
