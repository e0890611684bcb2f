"""XLA CPU's dense layer at decode shapes: (rows, 1, in) x weight, fp32 and bf16, both weight layouts.

A batch-1 decode step is one such product per weight matrix, so its speed is the rate at which the dot reads
the weight. This prints that rate for fp32 and bf16, for the weight stored (in, out) (`nnx.Linear`'s kernel)
and (out, in) (torch's `Linear`, the tied embedding table), with bf16 or fp32 accumulation, at 1, 2, 4 and 8 rows;
beside it the machine's read rate as `bench_generate.py` measures it (a one-row fp32 product over 1 GiB).

    python benchmarks/bench_matvec.py
    python benchmarks/bench_matvec.py --in-features 2048 --out-features 8192 --rows 1,2,8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encoder import cpu_model  # noqa: E402
from bench_generate import read_bandwidth  # noqa: E402

VARIANTS = {  # name -> (einsum, weight transposed, accumulate in fp32)
    "(in, out)": ("bsn,nm->bsm", False, False),
    "(in, out), fp32 acc": ("bsn,nm->bsm", False, True),
    "(out, in)": ("bsn,mn->bsm", True, False),
    "(out, in), fp32 acc": ("bsn,mn->bsm", True, True),
}


def best_seconds(f, *args, runs: int = 10) -> float:
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--out-features", type=int, default=3 * 8192)
    p.add_argument("--rows", default="1,2,4,8")
    args = p.parse_args(argv)
    n, m = args.in_features, args.out_features
    print(f"machine: {cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__}")
    print(f"memory read {read_bandwidth() / 1e9:.1f} GB/s; weight {n} x {m}")
    print("\n| rows | dtype | weight layout | ms | GB/s of weight read |\n|---|---|---|---|---|")
    w = np.random.default_rng(0).standard_normal((n, m)).astype(np.float32)
    for rows in [int(r) for r in args.rows.split(",")]:
        for dtype in (jnp.float32, jnp.bfloat16):
            for name, (spec, transposed, acc32) in VARIANTS.items():
                if dtype == jnp.float32 and acc32:
                    continue
                weight = jnp.asarray(w.T.copy() if transposed else w, dtype)
                x = jnp.ones((rows, 1, n), dtype)
                pref = jnp.float32 if acc32 else None
                f = jax.jit(lambda x, w, spec=spec, pref=pref: jnp.einsum(spec, x, w, preferred_element_type=pref))
                s = best_seconds(f, x, weight)
                print(f"| {rows} | {jnp.dtype(dtype).name} | {name} | {s * 1e3:.2f} | {weight.nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
