"""Peak memory and time of one `encode(waveform)` call against audio length (1, 10, 60 minutes by default).

`--model granite-speech` (default): the production 4.x encoder (16 x 1024, random weights) plus a 2-layer
1024-wide Q-Former projector; `--model speech5`: the production Granite Speech 5 (TurboCTC) encoder and its
CTC head's greedy ids (`Runner.ctc_frame_ids`). fp32, CPU. Each length runs in its own process, so peak RSS
is that call's: weights, the input waveform, features, hidden states, outputs and XLA's temporaries. Memory
beyond the weights should grow linearly with length.

    python benchmarks/longform_memory.py                      # ~20 min on 2 cores (the hour is ~15 of them)
    python benchmarks/longform_memory.py --minutes 1 5 --layers 2 --model speech5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import exit_on_sigterm

SR = 16000


def make_checkpoint(path: str, layers: int, model: str) -> None:
    """A granite_jax checkpoint with random weights at the production shapes (no torch needed)."""
    from flax import nnx

    if model == "speech5":
        from granite_jax.checkpoint import store as checkpoint
        from granite_jax.frontend.config import Speech5FeatureConfig
        from granite_jax.models import speech5
        from granite_jax.models.speech5_config import SPEECH5_PRODUCTION

        keep = tuple(i for i in SPEECH5_PRODUCTION.subsample_layers if i < layers)
        cfg = dataclasses.replace(SPEECH5_PRODUCTION, num_hidden_layers=layers, subsample_layers=keep)
        params = speech5.params_of(speech5.GraniteSpeech5Encoder(cfg, rngs=nnx.Rngs(0)))
        feats = Speech5FeatureConfig(num_mel_bins=cfg.num_mel_bins)
        checkpoint.save(path, cfg, params, {"source": "random"}, feature_config=feats, overwrite=True)
        return

    from granite_jax.checkpoint import store as checkpoint
    from granite_jax.cli.demo import DEMO_PROJECTOR
    from granite_jax.models.conformer import GraniteSpeechEncoder, params_of
    from granite_jax.models.conformer_config import PRODUCTION
    from granite_jax.models.projector import GraniteSpeechProjector, projector_params_of
    from granite_jax.models.projector_config import ProjectorConfig

    cfg = dataclasses.replace(PRODUCTION, num_layers=layers)
    pcfg = ProjectorConfig(**DEMO_PROJECTOR, encoder_hidden_size=cfg.output_width)
    params = params_of(GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0)))
    proj = projector_params_of(GraniteSpeechProjector(pcfg, rngs=nnx.Rngs(1)))
    checkpoint.save(
        path, cfg, params, {"source": "random"}, projector_config=pcfg, projector_params=proj, overwrite=True
    )


def child(path: str, minutes: float) -> None:
    import resource

    import jax
    import numpy as np
    import psutil

    import granite_jax

    model = granite_jax.load(path)
    loaded = psutil.Process().memory_info().rss
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(minutes * 60 * SR))).astype(np.float32)
    t0 = time.perf_counter()
    res = model.encode(wave)
    # Speech 5 has no projector: its output is the CTC head's greedy ids (argmax in tiles; the whole file's
    # vocabulary-wide logits would be 2.9 GB an hour)
    out = model.ctc_frame_ids(res.hidden_states) if model.projector is None else res.audio_embeddings
    jax.block_until_ready((res.hidden_states, out))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "minutes": minutes,
                "frames": int(res.lengths[0]),
                "embeddings": None if res.embedding_counts is None else int(res.embedding_counts[0]),
                "wall": wall,
                "loaded": loaded,
                "peak": peak,
                "input": wave.nbytes,
                "hidden": int(np.prod(res.hidden_states.shape)) * 4,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--model", choices=("granite-speech", "speech5"), default="granite-speech")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]))
        return
    if args.make:
        make_checkpoint(args.make[0], int(args.make[1]), args.model)
        return
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "gj")
        # in a subprocess: a child's ru_maxrss starts at its parent's peak, so the parent stays lean
        subprocess.run([sys.executable, __file__, "--make", ckpt, str(args.layers), "--model", args.model], check=True)
        rows = []
        for minutes in args.minutes:
            print(f"... {minutes:g} min", file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--child", ckpt, str(minutes)], capture_output=True, text=True
            )
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append({"minutes": minutes, "error": f"exit {out.returncode}"})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gb = 1e9
    what = "Granite Speech 5 encoder + greedy CTC ids" if args.model == "speech5" else "x 1024 + projector"
    print(
        f"\nencode(waveform), {args.layers} layers {what}, fp32, jax {jax.__version__} on "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs; one call per length, each in its own process\n"
    )
    print(
        "| audio | encoder frames | wall s (incl. compile) | real-time factor | RSS after load GB "
        "| peak RSS GB | peak - loaded GB | of which input + hidden states GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['minutes']:g} min | {r['error']} | | | | | | |")
            continue
        print(
            f"| {r['minutes']:g} min | {r['frames']} | {r['wall']:.1f} | {r['wall'] / (r['minutes'] * 60):.3f} "
            f"| {r['loaded'] / gb:.2f} | {r['peak'] / gb:.2f} | {(r['peak'] - r['loaded']) / gb:.2f} "
            f"| {(r['input'] + r['hidden']) / gb:.2f} |"
        )
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        slope = (b["peak"] - a["peak"]) / (b["minutes"] - a["minutes"])
        print(f"\npeak RSS grows {slope / gb * 60:.2f} GB per hour of audio ({a['minutes']:g} -> {b['minutes']:g} min)")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
