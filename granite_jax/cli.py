"""`granite-jax`: `demo` (the whole path on an embedded default, no downloads) and `convert`."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def demo(layers: int, seconds: float, runs: int, batch: int) -> int:
    """Make an HF checkpoint at the 4.1-2b encoder architecture, convert it, encode, compare with torch."""
    import jax
    import numpy as np

    import granite_jax
    from granite_jax.config import PRODUCTION
    from granite_jax.convert.convert import convert_checkpoint
    from granite_jax.reference import _require_torch, make_hf_checkpoint

    try:
        torch, _ = _require_torch()
    except ImportError as e:
        print(f"granite-jax demo compares against the torch reference: {e}", file=sys.stderr)
        return 1
    cfg = dataclasses.replace(PRODUCTION, num_layers=layers)
    frames = max(1, round(seconds * 50))
    print(
        f"granite-jax demo: {cfg.num_layers} layers x {cfg.hidden_dim}, {cfg.num_heads} heads x {cfg.dim_head}, "
        f"context {cfg.context_size}; {batch} x {seconds:g} s of audio ({frames} frames); "
        f"jax on {jax.default_backend()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = make_hf_checkpoint(cfg, f"{tmp}/hf", seed=0)
        print(f"[1/4] made a random HF checkpoint with transformers ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        convert_checkpoint(f"{tmp}/hf", f"{tmp}/gj")
        print(f"[2/4] converted it with granite-jax-convert ({time.perf_counter() - t0:.1f} s)")
        model = granite_jax.load(f"{tmp}/gj")
        x = np.random.default_rng(0).standard_normal((batch, frames, cfg.input_dim)).astype(np.float32)

        def run_jax():
            return jax.block_until_ready(model.encode_features(x))

        t0 = time.perf_counter()
        got = np.asarray(run_jax())
        first = time.perf_counter() - t0
        jax_times = _timed(run_jax, runs)
        print(f"[3/4] granite_jax encode_features: first call (compile + run) {first:.2f} s")
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            want = ref(xt).last_hidden_state.numpy()
            torch_times = _timed(lambda: ref(xt), runs)
        print("[4/4] HF torch reference done")
    err = float(np.abs(got - want).max() / np.abs(want).max())
    tj, tt = statistics.median(jax_times), statistics.median(torch_times)
    audio = batch * seconds
    print()
    print("| side | median s | real-time factor |")
    print("|---|---|---|")
    print(f"| HF torch | {tt:.3f} | {tt / audio:.4f} |")
    print(f"| granite_jax | {tj:.3f} | {tj / audio:.4f} |")
    print(f"\nspeed-up {tt / tj:.2f}x; parity max|jax - torch| / max|torch| = {err:.2e} (fp32)")
    return 0 if err < 1e-4 else 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="granite-jax", description="Granite Speech encoder in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="make, convert and run a random checkpoint at the real architecture; compare with torch"
    )
    d.add_argument("--layers", type=int, default=16, help="encoder depth (16 = granite-speech-4.1-2b)")
    d.add_argument("--seconds", type=float, default=10.0, help="audio length per utterance")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--runs", type=int, default=3, help="timed runs after the first call")
    c = sub.add_parser("convert", help="same as granite-jax-convert", add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "convert":
        from granite_jax.convert.cli import main as convert_main

        return convert_main(args.args)
    if args.layers < 1 or args.seconds <= 0 or args.runs < 1 or args.batch < 1:
        p.error("--layers, --seconds, --runs and --batch must be positive")
    return demo(args.layers, args.seconds, args.runs, args.batch)


if __name__ == "__main__":
    sys.exit(main())
