"""Side-by-side CPU benchmark: granite_jax `encode_features` vs the Hugging Face torch encoder.

`--model granite-speech` (default): the 4.x `GraniteSpeechCTCEncoder`; `--model speech5`: Granite Speech 5's
`GraniteSpeech5Encoder` (TurboCTC, 320-wide input frames, subsampled by 4).

Both sides run the same weights (a perturbed random HF checkpoint, converted once to granite_jax format) on the
same random features. Every (side, case) pair runs in its own fresh subprocess, so that peak RSS is per side and
per case. The parent process itself stays lean (numpy only; the checkpoint is made in a subprocess too): a child's
ru_maxrss starts at its parent's peak RSS (Linux carries it over fork/vfork + exec). Usage:

    python benchmarks/bench_encoder.py                                  # production config, default cases
    python benchmarks/bench_encoder.py --layers 2 --cases 10s,8x30s --runs 2   # quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from _common import exit_on_sigterm

FRAMES_PER_SECOND = 50  # encoder input frames per second of audio
INPUT_DIM = 160
SEED = 0
CASES: dict[str, tuple[int, int]] = {  # name -> (batch, seconds of audio per row)
    "10s": (1, 10),
    "30s": (1, 30),
    "120s": (1, 120),
    "8x30s": (8, 30),
    "600s": (1, 600),
    "32x30s": (32, 30),  # the GPU cases
    "64x30s": (64, 30),
}
DEFAULT_CASES = ("10s", "30s", "120s", "8x30s")
CHECK_CASE = "10s"  # the case whose outputs are compared between torch and jax
SIDES = ("torch", "jax")
COMPILED = "torch-compile"  # torch.compile (inductor), with --torch-compile: minutes to compile on CPU
GB = 1024**3


# ------------------------------------------------------------------------------------------------------------------
# helpers shared by parent and workers
# ------------------------------------------------------------------------------------------------------------------
def case_features(name: str, input_dim: int = INPUT_DIM) -> np.ndarray:
    """The (B, seconds * 50, input_dim) float32 standard-normal input of a case (same in every process)."""
    batch, seconds = CASES[name]
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((batch, seconds * FRAMES_PER_SECOND, input_dim), dtype=np.float32)


def audio_seconds(name: str) -> float:
    """Total seconds of audio in a case (all rows)."""
    batch, seconds = CASES[name]
    return float(batch * seconds)


def speech5_flops_per_frame(c: dict) -> float:
    """Multiply-add FLOPs (2 per MAC) of the Speech 5 encoder per input frame: every block at its own frame
    rate (halved after each subsampling block; a subsampling block's conv, second feed-forward and output at
    the half rate), the input projection, the self-conditioning head."""
    d, inner, i_ff = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["intermediate_size"]
    e, ctx, k = c["conv_expansion_factor"] * d, c["context_size"], c["conv_kernel_size"]
    ff = 2 * 2 * d * i_ff
    before = ff + 2 * d * 3 * inner + 2 * inner * d + 3 * 2 * ctx * inner + 2 * d * 2 * e  # ff1, attention, lin1
    after = 2 * k * e + 2 * e * d + ff  # depthwise, lin2, ff2
    rate, total = 1.0, 2 * 4 * c["num_mel_bins"] * d
    for i in range(c["num_hidden_layers"]):
        half = 0.5 if i in c["subsample_layers"] else 1.0
        total += rate * (before + half * after)
        rate *= half
        if i + 1 == c["num_hidden_layers"] // 2:
            total += rate * 2 * 2 * d * c["vocab_size"]
    return total


def flops_per_frame(c: dict) -> float:
    """Multiply-add FLOPs (2 per MAC) of the encoder per input frame, from the config dict.

    Per layer: two feed-forwards, the q/kv/out projections, the block-local core (q.k, the Shaw term
    q.E over c keys, weights.v), the conv module's pointwise convs and depthwise taps; plus the input
    projection and the self-conditioning head. 44.7 GFLOP per second of audio at production size.
    """
    d, inner, ctx = (
        c["hidden_dim"],
        c["num_heads"] * (c["dim_head"] or c["hidden_dim"] // c["num_heads"]),
        c["context_size"],
    )
    e = c["conv_expansion_factor"] * d
    layer = (
        2 * 2 * 2 * d * c["feedforward_mult"] * d  # ff1, ff2: up and down
        + 2 * d * 3 * inner
        + 2 * inner * d  # to_q, to_kv, to_out
        + 3 * 2 * ctx * inner  # q.k, Shaw term, weights.v
        + 2 * d * 2 * e
        + 2 * e * d
        + 2 * c["conv_kernel_size"] * e  # up_conv, down_conv, depthwise
    )
    head = 2 * c["input_dim"] * d + (2 * 2 * d * c["output_dim"] if c["num_layers"] >= 2 else 0)
    return c["num_layers"] * layer + head


def memory_status() -> dict[str, int]:
    """VmRSS (resident now), RssAnon, RssFile (file-backed, e.g. mmapped weights), VmHWM (peak) in bytes."""
    keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    return out


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return memory_status()["VmRSS"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    """CPU model name, family / model and the vector extensions that matter here, from /proc/cpuinfo.

    AMD family 25 is Zen 3 or Zen 4 (models 0x10-0x1f, 0x60-0x7f, 0xa0-0xaf are Zen 4), family 26 Zen 5.
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags", "vendor_id") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name", platform.processor() or "unknown")
    family, model = int(fields.get("cpu family", "0") or 0), int(fields.get("model", "0") or 0)
    arch = ""
    if fields.get("vendor_id") == "AuthenticAMD":
        zen4 = 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF
        arch = {26: "Zen 5", 25: "Zen 4" if zen4 else "Zen 3", 23: "Zen 2"}.get(family, "")
    flags = set(fields.get("flags", "").split())
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} (family {family}, model {model}{', ' + arch if arch else ''}; {', '.join(ext) or 'no AVX'})"


def version(dist: str) -> str:
    """Installed version of a distribution, or 'n/a'."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


# ------------------------------------------------------------------------------------------------------------------
# workers (one fresh process per side per case)
# ------------------------------------------------------------------------------------------------------------------
def _time_calls(fn: Any, n: int) -> list[float]:
    """Wall seconds of `n` calls of `fn`."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_worker() -> dict:
    """GFLOP/s of one 2048 x 2048 fp32 matmul: jax.jit(jnp.dot) and torch.matmul (best of 5 after warm-up)."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja = jnp.asarray(a)
    dot = jax.jit(jnp.dot)
    ta = torch.from_numpy(a)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, fn in (("jax", lambda: dot(ja, ja).block_until_ready()), ("torch", lambda: torch.matmul(ta, ta))):
        _time_calls(fn, 2)
        out[f"{name}_gflops"] = 2 * n**3 / min(_time_calls(fn, 5)) / 1e9
    return out


def worker(
    side: str,
    case: str,
    ckpt: str,
    *,
    runs: int,
    warmup: int,
    save: str | None,
    buckets: str,
    dtype: str = "float32",
    torch_device: str = "cpu",
    torch_dtype: str = "float32",
    model_kind: str = "granite-speech",
) -> dict:
    """Load one side's encoder from `ckpt`, time it on `case`, return the measurements."""
    features = case_features(case, 4 * 80 if model_kind == "speech5" else INPUT_DIM)
    rss_start = current_rss_bytes()
    last: dict[str, np.ndarray] = {}

    if side in ("torch", COMPILED):
        import torch
        from transformers import GraniteSpeechCTCEncoder

        torch.set_num_threads(os.cpu_count() or 1)
        rss_import = current_rss_bytes()
        t0 = time.perf_counter()
        tdtype = getattr(torch, torch_dtype)
        if model_kind == "speech5":
            from transformers import GraniteSpeech5ForCTC

            model = GraniteSpeech5ForCTC.from_pretrained(ckpt, dtype=tdtype).encoder.eval().to(torch_device)
        else:
            model = GraniteSpeechCTCEncoder.from_pretrained(ckpt, dtype=tdtype).eval().to(torch_device)
        # transformers maps the safetensors file lazily: touch every tensor so that the weights are resident
        # (as they are after the first forward) before the weights-only RSS is taken.
        with torch.inference_mode():
            for t in (*model.parameters(), *model.buffers()):
                t.sum()
        if side == COMPILED:
            model = torch.compile(model)
        load_s = time.perf_counter() - t0
        x = torch.from_numpy(features).to(torch_device, tdtype)

        def call() -> None:
            with torch.inference_mode():
                last["out"] = model(x).last_hidden_state
            if torch_device != "cpu":
                torch.cuda.synchronize()

        def to_numpy() -> np.ndarray:
            return last["out"].float().cpu().numpy()

        compiled = ", torch.compile (inductor)" if side == COMPILED else ""
        extra = {"torch_threads": torch.get_num_threads(), "backend": f"torch {torch_device}, {torch_dtype}{compiled}"}
    elif side == "jax":
        import jax

        import granite_jax

        rss_import = current_rss_bytes()
        t0 = time.perf_counter()
        model = granite_jax.load(ckpt, buckets=buckets, dtype=dtype)
        jax.block_until_ready(model.parameters())
        load_s = time.perf_counter() - t0

        def call() -> None:
            last["out"] = jax.block_until_ready(model.encode_features(features))

        def to_numpy() -> np.ndarray:
            return np.asarray(last["out"], np.float32)

        extra = {
            "backend": f"jax {jax.default_backend()} ({jax.devices()[0].device_kind}), {dtype}",
            "padded_frames": model.bucket_frames(features.shape[1]) if hasattr(model, "bucket_frames") else None,
        }
    else:
        raise ValueError(f"unknown side {side!r}")

    mem_loaded = memory_status()
    peak_loaded = peak_rss_bytes()

    # The first call is timed on its own: for jax it includes tracing + XLA compilation, which jax itself
    # reports (trace, lowering to MLIR, XLA compile): summed here, it is the compile cost free of run noise.
    compile_events = []
    if side == "jax":
        from jax import monitoring

        names = {f"/jax/core/compile/{e}_duration" for e in ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile")}

        def on_event(event: str, seconds: float, **_) -> None:
            if event in names:
                compile_events.append(seconds)

        monitoring.register_event_duration_secs_listener(on_event)
    first_s = _time_calls(call, 1)[0]
    if side == "jax":
        extra["trace_compile_s"] = sum(compile_events)
    warm_s = _time_calls(call, max(warmup - 1, 0))
    times = _time_calls(call, runs)
    out = to_numpy()
    median = statistics.median(times)
    if side == "jax":
        extra["num_compilations"] = model.num_compilations
    if save:
        np.save(save, out)
    return {
        "side": side,
        "case": case,
        "batch": features.shape[0],
        "frames": features.shape[1],
        "audio_s": audio_seconds(case),
        "output_shape": list(out.shape),
        "finite": bool(np.isfinite(out).all()),
        "load_s": load_s,
        "first_s": first_s,
        "compile_s": first_s - median,
        "warmup_s": warm_s,
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "rtf": median / audio_seconds(case),
        "rss_start_bytes": rss_start,
        "rss_import_bytes": rss_import,
        "rss_loaded_bytes": mem_loaded["VmRSS"],
        "rss_loaded_anon_bytes": mem_loaded["RssAnon"],
        "rss_loaded_file_bytes": mem_loaded["RssFile"],
        "peak_rss_loaded_bytes": peak_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "vm_hwm_bytes": memory_status()["VmHWM"],
        **extra,
    }


# ------------------------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------------------------
def prepare(directory: str, layers: int | None, model_kind: str = "granite-speech") -> dict:
    """Save the random HF checkpoint as `directory`/hf and its granite_jax conversion as `directory`/granite_jax."""
    from granite_jax.convert.convert import convert_checkpoint
    from granite_jax.models.conformer_config import PRODUCTION
    from granite_jax.models.speech5_config import SPEECH5_PRODUCTION
    from granite_jax.testing.hf import make_hf_checkpoint
    from granite_jax.testing.hf5 import make_hf5_checkpoint

    t0 = time.perf_counter()
    if model_kind == "speech5":
        cfg = (
            SPEECH5_PRODUCTION if layers is None else dataclasses.replace(SPEECH5_PRODUCTION, num_hidden_layers=layers)
        )
        ref = make_hf5_checkpoint(cfg, os.path.join(directory, "hf"), seed=SEED)
        config = dataclasses.asdict(cfg)
        config["subsample_layers"] = list(cfg.subsample_layers)
    else:
        cfg = PRODUCTION if layers is None else dataclasses.replace(PRODUCTION, num_layers=layers)
        ref = make_hf_checkpoint(cfg, os.path.join(directory, "hf"), seed=SEED)
        config = dataclasses.asdict(cfg)
    n_params = sum(p.numel() for p in ref.parameters())
    del ref
    gc.collect()
    convert_checkpoint(os.path.join(directory, "hf"), os.path.join(directory, "granite_jax"))
    return {"config": config, "model": model_kind, "n_params": n_params, "prepare_s": time.perf_counter() - t0}


def _run_json(cmd: list[str], what: str) -> dict:
    """Run a subprocess of this script; return the last JSON line of its stdout, or {'error': ...}."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        how = f"exit status {proc.returncode}" if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"
        msg = f"{what} failed ({how}); stderr tail:\n{tail or '(empty)'}"
        print(f"\nERROR: {msg}\n", file=sys.stderr, flush=True)
        return {"error": msg}
    return json.loads(lines[-1])


def run_worker(side: str, case: str, ckpt: str, args: argparse.Namespace, save: str | None) -> dict:
    """Run one worker subprocess; return its JSON result, or {'error': ...} if it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--case", case, "--ckpt", ckpt]
    cmd += ["--runs", str(args.runs), "--warmup", str(args.warmup), "--jax-buckets", args.jax_buckets]
    cmd += ["--jax-dtype", args.jax_dtype, "--torch-device", args.torch_device, "--torch-dtype", args.torch_dtype]
    cmd += ["--model", args.model]
    if save:
        cmd += ["--save", save]
    t0 = time.perf_counter()
    result = _run_json(cmd, f"{side} worker for case {case}")
    result.update(side=side, case=case, process_wall_s=time.perf_counter() - t0)
    return result


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _timing(r: dict) -> str:
    if "error" in r:
        return "FAILED"
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})"


def format_table(results: dict[str, dict[str, dict]], flops_frame: float, peak_gflops: float | None) -> str:
    """The markdown results table, one row per case. GFLOP/s count the audio's own frames, not padding."""
    head = (
        "| case | torch median s (min-max) | jax median s (min-max) | speed-up (torch/jax) | torch RTF | jax RTF "
        "| jax GFLOP/s | % of jnp.dot | jax compile s | jax first call s over median | torch peak RSS GB "
        "| jax peak RSS GB | RSS ratio (jax/torch) |"
    )
    with_compiled = any(COMPILED in sides for sides in results.values())
    if with_compiled:
        head += " torch.compile median s | speed-up (torch.compile/jax) | torch.compile first call s |"
    rows = [head, "|" + "---|" * (16 if with_compiled else 13)]
    for case, sides in results.items():
        t, j = sides["torch"], sides["jax"]
        ok_t, ok_j = "error" not in t, "error" not in j
        na = "n/a"
        gflops = (
            flops_frame * CASES[case][0] * CASES[case][1] * FRAMES_PER_SECOND / j["median_s"] / 1e9 if ok_j else None
        )
        rows.append(
            "| "
            + " | ".join(
                [
                    case,
                    _timing(t),
                    _timing(j),
                    f"{t['median_s'] / j['median_s']:.2f}x" if ok_t and ok_j else na,
                    f"{t['rtf']:.4f}" if ok_t else na,
                    f"{j['rtf']:.4f}" if ok_j else na,
                    f"{gflops:.0f}" if gflops else na,
                    f"{100 * gflops / peak_gflops:.0f}%" if gflops and peak_gflops else na,
                    f"{j['trace_compile_s']:.2f}" if ok_j and "trace_compile_s" in j else na,
                    f"{j['compile_s']:.1f}" if ok_j else na,
                    _gb(t["peak_rss_bytes"]) if ok_t else na,
                    _gb(j["peak_rss_bytes"]) if ok_j else na,
                    f"{j['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}" if ok_t and ok_j else na,
                ]
                + (_compiled_cells(sides.get(COMPILED), j) if with_compiled else [])
            )
            + " |"
        )
    return "\n".join(rows)


def _compiled_cells(c: dict, j: dict) -> list[str]:
    """torch.compile's median, jax's speed-up over it, and its first call (inductor's compile)."""
    if c is None or "error" in c:
        return ["FAILED", "n/a", "n/a"]
    up = f"{c['median_s'] / j['median_s']:.2f}x" if "error" not in j else "n/a"
    return [_timing(c), up, f"{c['first_s']:.1f}"]


def format_memory(results: dict[str, dict[str, dict]]) -> list[str]:
    """Weights-only RSS lines: RSS after imports and after loading, per side (from the first case that ran)."""
    lines = []
    for side in SIDES:
        r = next((s[side] for s in results.values() if "error" not in s[side]), None)
        if r is None:
            continue
        lines.append(
            f"- {side} weights-only RSS: {_gb(r['rss_loaded_bytes'])} GB after load "
            f"(imports alone {_gb(r['rss_import_bytes'])} GB, so weights ~"
            f"{_gb(r['rss_loaded_bytes'] - r['rss_import_bytes'])} GB; anon {_gb(r['rss_loaded_anon_bytes'])} + "
            f"file-backed {_gb(r['rss_loaded_file_bytes'])} GB; peak while loading "
            f"{_gb(r['peak_rss_loaded_bytes'])} GB; load {r['load_s']:.1f} s)"
        )
    return lines


def compare_outputs(torch_npy: str, jax_npy: str) -> dict[str, float]:
    """max|jax - torch| / max|torch| (and the plain max|diff|) of the saved outputs."""
    ref, got = np.load(torch_npy), np.load(jax_npy)
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: torch {ref.shape}, jax {got.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    return {"max_abs_diff": diff, "rel_err": diff / float(np.max(np.abs(ref)))}


def parse_cases(spec: str) -> list[str]:
    names = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise SystemExit(f"unknown case(s) {bad or spec!r}; choose from {', '.join(CASES)}")
    return names


def main_parent(args: argparse.Namespace) -> int:
    """Make the checkpoint, run every (case, side) worker, print the table. Returns the exit status."""
    cases = parse_cases(args.cases)
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": version("jax"),
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "runs": args.runs,
        "warmup": args.warmup,
        "jax_buckets": args.jax_buckets,
        "jax_dtype": args.jax_dtype,
        "loadavg_start": os.getloadavg(),
    }
    name = "Granite Speech 5 (TurboCTC)" if args.model == "speech5" else "Granite Speech 4.x"
    print(
        f"# granite_jax vs transformers encoder benchmark: {name}, {'production' if args.layers is None else 'reduced'}"
    )
    print(f"- CPU: {info['cpu']}, {info['cores']} cores (os.cpu_count)")
    print(
        f"- jax {info['jax']} (jaxlib {info['jaxlib']}, flax {info['flax']}), torch {info['torch']}, "
        f"transformers {info['transformers']}, python {info['python']}"
    )
    rounds = f"; {args.rounds} rounds, torch and jax alternating, each side's lowest median kept" * (args.rounds > 1)
    print(f"- {args.warmup} warm-up + {args.runs} timed runs per case; each side and case in a fresh process{rounds}")
    load1 = info["loadavg_start"][0]
    busy = " (WARNING: the machine is busy; timings will be noisy)" if load1 > 0.5 else ""
    print(f"- load average at start: {load1:.2f}{busy}")

    results: dict[str, dict[str, dict]] = {}
    check: dict[str, float] | None = None
    with tempfile.TemporaryDirectory(prefix="granite_bench_") as tmp:
        hf_dir, jax_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "granite_jax")
        cmd = [sys.executable, os.path.abspath(__file__), "--prepare", tmp, "--model", args.model]
        prep = _run_json(
            cmd + ([] if args.layers is None else ["--layers", str(args.layers)]), "checkpoint preparation"
        )
        if "error" in prep:
            return 1
        info.update(prep)
        c, n_params = prep["config"], prep["n_params"]
        if args.model == "speech5":
            print(
                f"- Granite Speech 5 encoder: {c['num_hidden_layers']} layers x {c['hidden_size']}, "
                f"{c['num_attention_heads']} heads x {c['head_dim']}, ff {c['intermediate_size']}, context "
                f"{c['context_size']}, conv kernel {c['conv_kernel_size']}, subsampling blocks "
                f"{c['subsample_layers']}, vocabulary {c['vocab_size']}; torch {args.torch_dtype} on "
                f"{args.torch_device}, jax {args.jax_dtype}"
            )
            flops_frame = speech5_flops_per_frame(c)
        else:
            print(
                f"- encoder: {c['num_layers']} layers x {c['hidden_dim']} wide, {c['num_heads']} heads x "
                f"{c['dim_head']}, ff x{c['feedforward_mult']}, context {c['context_size']}, conv kernel "
                f"{c['conv_kernel_size']}, output_dim {c['output_dim']}; torch {args.torch_dtype} on "
                f"{args.torch_device}, jax {args.jax_dtype}"
            )
            flops_frame = flops_per_frame(c)
        print(f"- {flops_frame * FRAMES_PER_SECOND / 1e9:.1f} GFLOP per second of audio (analytic, multiply-adds x 2)")
        peak = _run_json([sys.executable, os.path.abspath(__file__), "--peak"], "matmul peak")
        peak_gflops = peak.get("jax_gflops")
        if peak_gflops:
            info["matmul_peak"] = peak
            print(
                f"- 2048 x 2048 fp32 matmul: jax.jit(jnp.dot) {peak_gflops:.0f} GFLOP/s, torch.matmul "
                f"{peak['torch_gflops']:.0f} GFLOP/s (best of 5)",
                flush=True,
            )
        print(f"- weights: {n_params / 1e6:.1f}M parameters ({n_params * 4 / GB:.2f} GB fp32)")
        print(f"- checkpoint made and converted in {prep['prepare_s']:.1f} s (in a subprocess)", flush=True)

        for case in cases:
            results[case] = {}
            for _ in range(args.rounds):  # the sides alternate, process by process; each side's fastest kept
                for side in SIDES + ((COMPILED,) if args.torch_compile else ()):
                    save = os.path.join(tmp, f"{side}_{case}.npy") if args.check and case == CHECK_CASE else None
                    ckpt = jax_dir if side == "jax" else hf_dir
                    print(f"  running {side:5s} {case} ...", end="", file=sys.stderr, flush=True)
                    r = run_worker(side, case, ckpt, args, save)
                    if "error" not in r:
                        print(f" median {r['median_s']:.3f} s", file=sys.stderr, flush=True)
                        if not r["finite"]:
                            print(f"WARNING: {side} output for {case} is not finite", file=sys.stderr)
                    kept = results[case].get(side)
                    if kept is None or "error" in r or ("error" not in kept and r["median_s"] < kept["median_s"]):
                        results[case][side] = r
        if args.check and CHECK_CASE in results and all("error" not in r for r in results[CHECK_CASE].values()):
            check = compare_outputs(*(os.path.join(tmp, f"{s}_{CHECK_CASE}.npy") for s in SIDES))

    info["loadavg_end"] = os.getloadavg()
    backend = next((s["jax"]["backend"] for s in results.values() if "error" not in s["jax"]), None)
    if backend:
        print(f"- jax backend: {backend}")
    print(*format_memory(results), sep="\n")
    print()
    print(f"{info['cpu']}, {info['cores']} cores:\n")  # beside the table: machines differ between runs
    print(format_table(results, flops_frame, peak_gflops))
    print()
    padded = [
        f"{c} {s['jax']['frames']}->{s['jax']['padded_frames']}" for c, s in results.items() if "error" not in s["jax"]
    ]
    print(f"jax pads frames to a length bucket ({args.jax_buckets!r}): {', '.join(padded)}.")
    rtfx = [
        f"{c} torch {1 / s['torch']['rtf']:.1f}, jax {1 / s['jax']['rtf']:.1f}"
        for c, s in results.items()
        if "error" not in s["torch"] and "error" not in s["jax"]
    ]
    print(f"RTFx (seconds of audio per wall second): {'; '.join(rtfx)}.")
    print(
        "RTF = median seconds / seconds of audio (all rows). jax compile s = trace + lowering + XLA compile of the "
        "first call, as jax reports them (jax.monitoring). jax first call s over median = first call (trace, "
        "compile, first run) - median steady call: it also carries run-to-run noise. % of jnp.dot = jax GFLOP/s / "
        "the matmul line above."
    )
    non_finite = [f"{c}/{side}" for c, s in results.items() for side, r in s.items() if r.get("finite") is False]
    if non_finite:
        print(f"NOT FINITE outputs: {', '.join(non_finite)}")
    if check is not None:
        print(
            f"check ({CHECK_CASE}): max|jax - torch| / max|torch| = {check['rel_err']:.2e} "
            f"(max|diff| = {check['max_abs_diff']:.2e})"
        )
    failed = [f"{c}/{side}" for c, s in results.items() for side, r in s.items() if "error" in r]
    if failed:
        print(f"FAILED workers: {', '.join(failed)} (see the errors above)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "check": check}, f, indent=2)
        print(f"raw results written to {args.json}")
    return 1 if failed or non_finite else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("granite-speech", "speech5"), default="granite-speech", help="which encoder")
    p.add_argument("--layers", type=int, default=None, help="encoder depth (default: production, 16)")
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated cases from {', '.join(CASES)} (default: {','.join(DEFAULT_CASES)})",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per case (default 3)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="processes per side and case, torch and jax alternating; each side's lowest median kept (default 1)",
    )
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per case, the first call included (default 1)")
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"compare jax vs torch outputs on the {CHECK_CASE} case (default on)",
    )
    p.add_argument("--jax-buckets", default="auto", choices=("auto", "block"), help="granite_jax length buckets")
    p.add_argument(
        "--jax-dtype", default="float32", choices=("float32", "bfloat16"), help="granite_jax weights and compute"
    )
    p.add_argument("--torch-device", default="cpu", help="torch device for the reference side (cpu, cuda)")
    p.add_argument(
        "--torch-dtype", default="float32", choices=("float32", "bfloat16", "float64"), help="torch reference dtype"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the raw results as JSON")
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    # internal: one worker process
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time torch.compile (inductor) in its own process (its first call takes minutes on CPU)",
    )
    p.add_argument("--worker", choices=(*SIDES, COMPILED), help=argparse.SUPPRESS)
    p.add_argument("--case", choices=tuple(CASES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first call is always a warm-up)")
    if args.layers is not None and args.layers < 0:
        p.error("--layers must be non-negative")
    if args.worker and not (args.case and args.ckpt):
        p.error("--worker needs --case and --ckpt")
    return args


def main() -> None:
    args = parse_args()
    if args.peak:
        print(json.dumps(peak_worker()), flush=True)
        return
    if args.prepare:
        print(json.dumps(prepare(args.prepare, args.layers, args.model)), flush=True)
        return
    if args.worker:
        result = worker(
            args.worker,
            args.case,
            args.ckpt,
            runs=args.runs,
            warmup=args.warmup,
            save=args.save,
            buckets=args.jax_buckets,
            dtype=args.jax_dtype,
            torch_device=args.torch_device,
            torch_dtype=args.torch_dtype,
            model_kind=args.model,
        )
        print(json.dumps(result), flush=True)
        return
    sys.exit(main_parent(args))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
