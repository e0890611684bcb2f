"""XLA CPU's dense layer at decode shapes: (rows, in) x weight, fp32 and bf16, in each operand order.

A batch-1 decode step is one such product per weight matrix, so its speed is the rate at which the dot reads
the weight. This prints that rate for fp32 and bf16 (summed in fp32) at 1, 2, 4, 8 and 9 rows, for the weight
stored (in, out) (`nnx.Linear`'s kernel), stored (out, in) (torch's `Linear`) as the right operand, the same
as the left operand with the result kept (out, rows), and for `times_transposed` (what the language model
runs); beside it the run's `jnp.dot` fp32 peak and the machine's read rate as `bench_generate.py` measures it (a
one-row fp32 product over 1 GiB).

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

from granite_jax.models.layers import accumulator, times_transposed  # noqa: E402


def _weight_first(x, w, acc):
    out = jnp.einsum("oi,ni->on", w, x, preferred_element_type=acc)  # (out, rows), kept so by the barrier
    return jax.lax.optimization_barrier(out).T


VARIANTS = {  # name -> (product of x (rows, in) and the weight, weight stored transposed)
    "(in, out)": (lambda x, w, acc: jnp.einsum("ni,io->no", x, w, preferred_element_type=acc), False),
    "(out, in), x first": (lambda x, w, acc: jnp.einsum("ni,oi->no", x, w, preferred_element_type=acc), True),
    "(out, in), weight first": (_weight_first, True),
    "times_transposed": (lambda x, w, acc: times_transposed(x, w, x.dtype), True),
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
    p.add_argument("--rows", default="1,2,4,8,9")
    args = p.parse_args(argv)
    n, m = args.in_features, args.out_features
    print(f"machine: {cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__}")
    a = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 2048)), jnp.float32)
    dot = 2 * 2048**3 / best_seconds(jax.jit(jnp.dot), a, a, runs=5) / 1e9
    print(f"peaks this run: jnp.dot fp32 {dot:.0f} GFLOP/s; memory read {read_bandwidth() / 1e9:.1f} GB/s")
    print(f"weight {n} x {m}")
    print("\n| rows | dtype | weight | ms | GB/s of weight read |\n|---|---|---|---|---|")
    w = np.random.default_rng(0).standard_normal((n, m)).astype(np.float32)
    for rows in [int(r) for r in args.rows.split(",")]:
        for dtype in (jnp.float32, jnp.bfloat16):
            acc = accumulator(dtype)
            for name, (product, transposed) in VARIANTS.items():
                weight = jnp.asarray(w.T.copy() if transposed else w, dtype)
                x = jnp.ones((rows, n), dtype)
                f = jax.jit(lambda x, w, product=product, acc=acc: product(x, w, acc))
                s = best_seconds(f, x, weight)
                print(f"| {rows} | {jnp.dtype(dtype).name} | {name} | {s * 1e3:.2f} | {weight.nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
