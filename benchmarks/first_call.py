"""What the first `encode` call at a new length bucket costs, against a steady call (JAX only).

For each length: jax's own tracing, lowering and XLA compile time of the first call (jax.monitoring),
the first call's wall time, the median of later calls, and the difference. Production encoder (16 x 1024)
and a 2-layer 1024-wide Q-Former projector, random weights, fp32, one process. Usage:

    python benchmarks/first_call.py                       # 3.2, 10, 30 and 120 s; about 4 min on 2 cores
    python benchmarks/first_call.py --seconds 10 30 --runs 5
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import jax
import numpy as np
from flax import nnx
from jax import monitoring

from granite_jax.cli import DEMO_PROJECTOR
from granite_jax.config import PRODUCTION, ProjectorConfig
from granite_jax.modeling import GraniteSpeechEncoder
from granite_jax.projector import GraniteSpeechProjector
from granite_jax.runner import Runner

SR = 16000
COMPILE_EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[3.2, 10, 30, 120])
    p.add_argument("--runs", type=int, default=3, help="steady calls after the first (median)")
    args = p.parse_args()

    events: dict[str, float] = defaultdict(float)

    def on_event(event: str, seconds: float, **_) -> None:
        events[event.rsplit("/", 1)[-1]] += seconds

    monitoring.register_event_duration_secs_listener(on_event)
    pcfg = ProjectorConfig(**DEMO_PROJECTOR, encoder_hidden_size=PRODUCTION.output_width)
    model = Runner(
        GraniteSpeechEncoder(PRODUCTION, rngs=nnx.Rngs(0)), projector=GraniteSpeechProjector(pcfg, rngs=nnx.Rngs(1))
    )
    print(f"encode(waveform), production encoder + projector, fp32, jax {jax.__version__} on {jax.devices()[0]}")
    print("\n| audio s | compile s (jax) | first call s | steady median s | first - steady s |\n|---|---|---|---|---|")
    for seconds in args.seconds:
        wave = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)

        def call(wave: np.ndarray = wave) -> float:
            t0 = time.perf_counter()
            jax.block_until_ready(model.encode(wave).audio_embeddings)
            return time.perf_counter() - t0

        events.clear()
        first = call()
        compile_s = sum(events[e] for e in COMPILE_EVENTS)
        steady = float(np.median([call() for _ in range(args.runs)]))
        print(f"| {seconds:g} | {compile_s:.2f} | {first:.2f} | {steady:.2f} | {first - steady:.2f} |", flush=True)


if __name__ == "__main__":
    main()
