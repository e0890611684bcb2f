"""Side-by-side CPU benchmark of one training step: granite_jax `Trainer.step` against the same step in torch.

One step is forward, the CTC loss (torch's definition), backward and an AdamW update, on the production encoder
(or `--layers N`), same weights (a perturbed random HF checkpoint, converted once) and the same batch, fp32.
Each side and case runs in its own fresh process (peak RSS per side); jax runs with and without per-block
rematerialisation. Usage:

    python benchmarks/bench_train.py                      # 4 x 10 s and 8 x 30 s, production encoder
    python benchmarks/bench_train.py --layers 2 --cases 4x10s --runs 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_encoder as be  # noqa: E402  (the shared helpers: CPU, RSS, matmul peak, checkpoint)
from _common import exit_on_sigterm

CASES = {"4x10s": (4, 10), "8x30s": (8, 30), "2x10s": (2, 10)}
DEFAULT_CASES = ("4x10s", "8x30s")
LABELS_PER_SECOND = 12  # characters per second of speech, about
SIDES = ("torch", "jax", "jax-remat")


def case_batch(name: str, output_dim: int) -> dict[str, np.ndarray]:
    b, seconds = CASES[name]
    t = seconds * be.FRAMES_PER_SECOND
    rng = np.random.default_rng(be.SEED)
    n = seconds * LABELS_PER_SECOND
    return {
        "features": rng.standard_normal((b, t, be.INPUT_DIM), dtype=np.float32),
        "lengths": np.full(b, t, np.int32),
        "labels": rng.integers(1, output_dim, (b, n)).astype(np.int32),
        "label_lengths": np.full(b, n, np.int32),
    }


def worker(side: str, case: str, ckpt: str, runs: int, warmup: int) -> dict:
    rss_start = be.current_rss_bytes()
    if side == "torch":
        import torch
        from transformers import GraniteSpeechCTCEncoder

        torch.set_num_threads(os.cpu_count() or 1)
        model = GraniteSpeechCTCEncoder.from_pretrained(ckpt).train()
        batch = case_batch(case, model.config.output_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        x = torch.from_numpy(batch["features"])
        args = [torch.from_numpy(batch[k]).long() for k in ("labels", "lengths", "label_lengths")]

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            h = model(x).last_hidden_state
            logp = torch.log_softmax(model.out(h), -1).transpose(0, 1)
            loss = torch.nn.functional.ctc_loss(logp, *args, blank=0, reduction="mean", zero_infinity=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

    else:
        import jax

        import granite_jax
        from granite_jax.train import TrainConfig, Trainer

        model = granite_jax.load(ckpt).model
        batch = case_batch(case, model.config.output_dim)
        trainer = Trainer(model, TrainConfig(learning_rate=1e-4, grad_clip=None, remat=side == "jax-remat"))
        keys = iter(jax.random.split(jax.random.key(0), warmup + runs))

        def step() -> float:
            return trainer.step(batch, next(keys))["loss"]

    rss_loaded = be.current_rss_bytes()
    t0 = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times = be._time_calls(step, runs)
    return {
        "side": side,
        "case": case,
        "first_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "first_loss": first_loss,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": be.peak_rss_bytes(),
    }


def main_parent(args: argparse.Namespace) -> int:
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    print(f"# granite_jax vs torch: one training step ({'production' if args.layers is None else 'reduced'} encoder)")
    print(f"- CPU: {be.cpu_model()}, {os.cpu_count()} cores")
    print(
        f"- jax {be.version('jax')}, flax {be.version('flax')}, optax {be.version('optax')}, "
        f"torch {be.version('torch')}"
    )
    print(
        f"- load average at start: {os.getloadavg()[0]:.2f}; {args.warmup} warm-up + {args.runs} timed steps per case"
    )
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="granite_bench_train_") as tmp:
        cmd = [sys.executable, be.__file__, "--prepare", tmp] + (
            [] if args.layers is None else ["--layers", str(args.layers)]
        )
        prep = be._run_json(cmd, "checkpoint preparation")
        if "error" in prep:
            return 1
        c = prep["config"]
        peak = be._run_json([sys.executable, be.__file__, "--peak"], "matmul peak")
        flops_frame = 3 * be.flops_per_frame(c)  # forward + backward (about twice the forward)
        print(
            f"- encoder: {c['num_layers']} layers x {c['hidden_dim']}, {prep['n_params'] / 1e6:.0f}M parameters, fp32"
        )
        print(
            f"- 2048 x 2048 fp32 matmul: jax.jit(jnp.dot) {peak.get('jax_gflops', 0):.0f} GFLOP/s, torch.matmul "
            f"{peak.get('torch_gflops', 0):.0f} GFLOP/s; a step counted as 3x the forward's FLOPs"
        )
        for case in cases:
            results[case] = {}
            for side in SIDES:
                ckpt = os.path.join(tmp, "hf" if side == "torch" else "granite_jax")
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    side,
                    "--case",
                    case,
                    "--ckpt",
                    ckpt,
                    "--runs",
                    str(args.runs),
                    "--warmup",
                    str(args.warmup),
                ]
                print(f"  running {side:9s} {case} ...", end="", file=sys.stderr, flush=True)
                r = be._run_json(cmd, f"{side} {case}")
                results[case][side] = r
                print(f" median {r.get('median_s', float('nan')):.2f} s", file=sys.stderr, flush=True)
    print()
    print(
        "| case | torch s | jax s | jax remat s | speed-up | speed-up (remat) | jax GFLOP/s (% of jnp.dot) "
        "| peak RSS torch GB | jax GB | jax remat GB | first loss torch / jax |"
    )
    print("|" + "---|" * 11)
    for case, s in results.items():
        t, j, r = (s[k] for k in SIDES)
        if any("error" in x for x in (t, j, r)):
            print(f"| {case} | FAILED |")
            continue
        b, sec = CASES[case]
        gflops = flops_frame * b * sec * be.FRAMES_PER_SECOND / j["median_s"] / 1e9
        share = f" ({100 * gflops / peak['jax_gflops']:.0f}%)" if peak.get("jax_gflops") else ""
        print(
            f"| {case} | {t['median_s']:.2f} | {j['median_s']:.2f} | {r['median_s']:.2f} | "
            f"{t['median_s'] / j['median_s']:.2f}x | {t['median_s'] / r['median_s']:.2f}x | {gflops:.0f}{share} | "
            f"{be._gb(t['peak_rss_bytes'])} | {be._gb(j['peak_rss_bytes'])} | {be._gb(r['peak_rss_bytes'])} | "
            f"{t['first_loss']:.3f} / {j['first_loss']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "peak": peak, "config": c}, f, indent=2)
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.case, args.ckpt, args.runs, args.warmup)), flush=True)
        return
    sys.exit(main_parent(args))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
