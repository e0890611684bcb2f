"""Where the encoder's time and memory go, at production width, on this machine (JAX only).

Prints (1) achieved GFLOP/s of each conformer submodule against one `jnp.dot` (2048 x 2048, fp32) and
(2) the whole encoder's compile time (`lower().compile()`) and XLA's compiled temporary memory against
depth, tiled as `load` runs it (`chunk_blocks=8`). Usage:

    python benchmarks/profile_encoder.py [--frames 1600] [--batch 1]
    python benchmarks/profile_encoder.py --frames 192000 --compile-only     # an hour: compile and memory only
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.models import conformer as modeling
from granite_jax.models.conformer_config import PRODUCTION
from granite_jax.runtime import tiling


def best_time(fn, *args, runs: int = 5) -> float:
    """Fastest of `runs` calls after one warm-up (seconds)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def compile_stats(cfg, batch: int, frames: int, chunk_blocks: int | None = 8) -> tuple[float, int, int]:
    """(lower + compile seconds, temporary bytes, output bytes) of one forward; nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: modeling.GraniteSpeechEncoder(cfg)))
    x = jax.ShapeDtypeStruct((batch, frames, cfg.input_dim), jnp.float32)
    valid = jax.ShapeDtypeStruct((batch, frames), jnp.bool_)
    fwd = jax.jit(lambda s, x, v: tiling.encode(nnx.merge(graphdef, s), x, v, chunk_blocks))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, x, valid).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return seconds, mem.temp_size_in_bytes, mem.output_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1600)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile-only", action="store_true", help="skip the timings (long inputs)")
    p.add_argument("--dtype", default="float32", help="parameter and compute dtype of the timed block (bfloat16)")
    args = p.parse_args()
    b, t = args.batch, args.frames
    cfg = dataclasses.replace(PRODUCTION, num_layers=1)
    d, c, inner = cfg.hidden_dim, cfg.context_size, cfg.inner_dim
    dtype = jnp.dtype(args.dtype)
    block = modeling.GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype).layer(0)
    if not args.compile_only:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((b, t, d), np.float32), dtype)
        valid = jnp.ones((b, t), bool)
        ff = 2 * b * t * d * cfg.feedforward_mult * d * 2
        attn = 2 * b * t * d * 3 * inner + 2 * b * t * inner * d + 3 * 2 * b * t * c * inner
        conv = 2 * b * t * d * 4 * d + 2 * b * t * 2 * d * d
        parts = {
            "feed-forward": (lambda x: block.ff1(x), ff),
            "attention": (lambda x: block.attn(x, valid), attn),
            "conv module": (lambda x: block.conv(x, valid), conv),
            "block": (lambda x: block(x, valid), 2 * ff + attn + conv),
            "block (tiled)": (
                lambda x: tiling.Tiled(8 * c, c).block(block, x, valid, lambda o, v: o),
                2 * ff + attn + conv,
            ),
        }
        a = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 2048), np.float32))
        peak = 2 * 2048**3 / best_time(jax.jit(lambda a: a @ a), a) / 1e9
        print(
            f"jax {jax.__version__} on {jax.devices()[0].device_kind}; input {b} x {t} frames; "
            f"{dtype.name}; jnp.dot fp32 {peak:.0f} GFLOP/s"
        )
        print("\n| part | ms | GFLOP/s | % of jnp.dot |\n|---|---|---|---|")
        for name, (fn, flops) in parts.items():
            s = best_time(nnx.jit(fn), x)
            print(f"| {name} | {s * 1e3:.1f} | {flops / s / 1e9:.0f} | {100 * flops / s / 1e9 / peak:.0f}% |")
    print(
        f"\n{b} x {t} frames, chunk_blocks=8:\n"
        "| layers | lower + compile s | temporaries MB | output MB |\n|---|---|---|---|"
    )
    for layers in (2, 4, 8, 16):
        sec, temp, out = compile_stats(dataclasses.replace(PRODUCTION, num_layers=layers), b, t)
        print(f"| {layers} | {sec:.2f} | {temp / 1e6:.0f} | {out / 1e6:.0f} |")


if __name__ == "__main__":
    main()
