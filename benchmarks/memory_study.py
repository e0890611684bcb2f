"""Peak memory and time of one conformer attention layer: the old broadcast-and-sum Shaw term, torch's einsum, JAX.

Granite Speech's attention adds a Shaw relative-position term to its logits: for every query q (dim_head d) and
every key in its block of c frames, q . table[dist(q, k)], where the (c, c, d) table is gathered from the
embedding once. The Hugging Face torch encoder used to compute it by broadcasting

    pos_attn = torch.sum(query_states.unsqueeze(-2) * rel_pos_emb_expanded, dim=-1) * self.scale

with queries (batch, blocks, heads, c, d) and the table viewed as (1, 1, 1, c, c, d): a 6-D
(batch, blocks, heads, c, c, d) product, d = 128 times the size of the (batch, blocks, heads, c, c) result,
164 MB per 4-second block at production width in fp32. It now uses
`torch.einsum("b h c d, c r d -> b h c r", ...)` (the broadcast form survives as a comment above it in
transformers' `GraniteSpeechConformerAttention.forward`). granite_jax's `Attention` contracts the same way.

Three variants of ONE attention layer forward at production width (hidden 1024, 8 heads x 128, context 200),
fp32 on CPU, batch 1, random weights, 50 encoder frames per second of audio:

- `torch-broadcast`: transformers' `GraniteSpeechConformerAttention` with its einsum swapped for the old
  broadcast-and-sum (`old_forward` below, otherwise the current forward line for line);
- `torch-einsum`: transformers' `GraniteSpeechConformerAttention` as it is;
- `granite_jax`: `granite_jax.models.conformer.Attention` under `jax.jit` (compiled before measuring).

Each (variant, length) runs in its own process: one warm-up call, then the peak RSS high-water mark is reset
(`/proc/self/clear_refs`; where that is not allowed, `ru_maxrss` is used and includes earlier peaks) and the
measured call's peak RSS minus the RSS just before it is reported, with the median wall time of `--runs`
calls. `torch-broadcast` is skipped where its 6-D intermediate alone would exceed `--limit-gb`.

    python benchmarks/memory_study.py                           # 10..240 s, a few minutes on 2 cores
    python benchmarks/memory_study.py --seconds 4 12 --limit-gb 0.2 --runs 2   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import textwrap
import time

FPS = 50  # encoder frames per second of audio (10 ms hop, stacked by 2)
HIDDEN, HEADS, DIM_HEAD, CONTEXT, MAX_POS_EMB = 1024, 8, 128, 200, 512  # PRODUCTION's (models/conformer_config.py)
VARIANTS = ("torch-broadcast", "torch-einsum", "granite_jax")
LABELS = {
    "torch-broadcast": "torch broadcast+sum (old HF)",
    "torch-einsum": "torch einsum (current HF)",
    "granite_jax": "granite_jax Attention (jit)",
}
DEFAULT_SECONDS = (10, 30, 60, 120, 240)
FP32 = 4
# glibc serves allocations of at least this many bytes with their own mmap and unmaps them when freed, so a
# call's large temporaries show in RSS instead of reusing heap pages the warm-up (or the JAX compile) left
# behind. A fixed value also turns off glibc's adaptive threshold, which climbs to 32 MB.
MMAP_THRESHOLD = 1 << 20


def frames(seconds: float) -> int:
    return round(seconds * FPS)


def blocks(seconds: float) -> int:
    return math.ceil(frames(seconds) / CONTEXT)


def intermediate_bytes(seconds: float, batch: int = 1) -> int:
    """Bytes of the old expression's (batch, blocks, heads, c, c, dim_head) fp32 product."""
    return batch * blocks(seconds) * HEADS * CONTEXT * CONTEXT * DIM_HEAD * FP32


def pos_attn_bytes(seconds: float, batch: int = 1) -> int:
    """Bytes of the (batch, blocks, heads, c, c) fp32 relative-position logits every variant produces."""
    return batch * blocks(seconds) * HEADS * CONTEXT * CONTEXT * FP32


# ----------------------------------------------------------------------------------------------- torch side


def hf_attention(seed: int = 0):
    """transformers' `GraniteSpeechConformerAttention` at production width (random init) and its (c, c) dists."""
    import torch
    from transformers import GraniteSpeechEncoderConfig
    from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechConformerAttention

    torch.manual_seed(seed)
    cfg = GraniteSpeechEncoderConfig(
        hidden_dim=HIDDEN, num_heads=HEADS, dim_head=DIM_HEAD, context_size=CONTEXT, max_pos_emb=MAX_POS_EMB
    )
    attn = GraniteSpeechConformerAttention(cfg).eval()
    seq = torch.arange(CONTEXT)  # as GraniteSpeechCTCEncoder builds its attention_dists buffer
    dists = torch.clamp(seq.view(-1, 1) - seq.view(1, -1), -CONTEXT, CONTEXT) + MAX_POS_EMB
    return attn, dists


def old_pos_attn(query_states, rel_pos_emb, scale: float):
    """The old Shaw term: (batch, blocks, heads, c, 1, d) * (1, 1, 1, c, c, d), summed over d."""
    rel_pos_emb_expanded = rel_pos_emb.view([1, 1, 1] + list(rel_pos_emb.shape))
    return (query_states.unsqueeze(-2) * rel_pos_emb_expanded).sum(-1) * scale


def old_forward(self, hidden_states, attention_dists):
    """`GraniteSpeechConformerAttention.forward` (transformers 5.x) with the einsum replaced by `old_pos_attn`.

    The current forward flattens (batch, blocks) into one axis; the old code kept them apart, so the queries
    are viewed as (batch, blocks, heads, c, d) for the product, as it had them.
    """
    import torch
    import torch.nn.functional as F

    hidden_states = self.pre_norm(hidden_states)
    bsz, num_features, _ = hidden_states.shape
    num_blocks = math.ceil(num_features / self.context_size)
    remainder = num_features % self.context_size
    if remainder > 0:
        hidden_states = F.pad(hidden_states, (0, 0, 0, self.context_size - remainder))
    query_states = self.to_q(hidden_states)
    key_states, value_states = self.to_kv(hidden_states).chunk(2, dim=-1)
    flat_bsz = bsz * num_blocks
    query_states = query_states.reshape(flat_bsz, self.context_size, self.num_heads, -1).transpose(1, 2)
    key_states = key_states.reshape(flat_bsz, self.context_size, self.num_heads, -1).transpose(1, 2)
    value_states = value_states.reshape(flat_bsz, self.context_size, self.num_heads, -1).transpose(1, 2)

    rel_pos_emb = self.rel_pos_emb(attention_dists)
    q6 = query_states.view(bsz, num_blocks, self.num_heads, self.context_size, -1)
    pos_attn = old_pos_attn(q6, rel_pos_emb, self.scale).view(flat_bsz, self.num_heads, *rel_pos_emb.shape[:2])

    if remainder > 0:
        mask = torch.ones(self.context_size, self.context_size, dtype=bool, device=hidden_states.device)
        mask[:remainder, :remainder] = 0
        mask_value = -torch.finfo(pos_attn.dtype).max
        pos_attn[num_blocks - 1 : pos_attn.shape[0] : num_blocks].masked_fill_(mask, mask_value)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            query_states, key_states, value_states, attn_mask=pos_attn, scale=self.scale
        )
    out = out.transpose(1, 2).reshape(bsz, hidden_states.shape[1], -1)
    return self.dropout(self.to_out(out[:, :num_features, :]))


# ------------------------------------------------------------------------------------------------- jax side


def jax_attention(seed: int = 0):
    """granite_jax's `Attention` at production width (random init)."""
    from flax import nnx

    from granite_jax.models.conformer import Attention
    from granite_jax.models.conformer_config import PRODUCTION

    return Attention(PRODUCTION, rngs=nnx.Rngs(seed))


def jax_attention_from_torch(attn):
    """granite_jax's `Attention` carrying the weights of a torch `GraniteSpeechConformerAttention`."""
    import jax.numpy as jnp

    model = jax_attention()
    sd = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
    model.pre_norm.scale[...] = jnp.asarray(sd["pre_norm.weight"])
    model.pre_norm.bias[...] = jnp.asarray(sd["pre_norm.bias"])
    for name in ("to_q", "to_kv", "to_out"):
        getattr(model, name).kernel[...] = jnp.asarray(sd[f"{name}.weight"].T)
    model.to_out.bias[...] = jnp.asarray(sd["to_out.bias"])
    model.rel_pos_emb.embedding[...] = jnp.asarray(sd["rel_pos_emb.weight"])
    return model


def jax_inputs(x):
    """(1, T, D) numpy -> padded to a multiple of the context and its valid mask, as the encoder feeds them."""
    import jax.numpy as jnp
    import numpy as np

    t = x.shape[1]
    pad = -t % CONTEXT
    return jnp.asarray(np.pad(x, ((0, 0), (0, pad), (0, 0)))), jnp.asarray(np.arange(t + pad)[None] < t)


# -------------------------------------------------------------------------------------------- measurement


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _limit_threads(threads: int) -> None:
    if threads > 0:  # before torch / jax are imported
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        )
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)


def child(variant: str, seconds: float, runs: int, threads: int) -> dict:
    """Build one variant, warm it up, then measure one call's peak RSS increase and `runs` calls' wall time."""
    _limit_threads(threads)
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, frames(seconds), HIDDEN)).astype(np.float32)
    extra = {}
    if variant == "granite_jax":
        import jax
        from flax import nnx

        graphdef, state = nnx.split(jax_attention())
        xp, valid = jax_inputs(x)
        compiled = jax.jit(lambda s, x, v: nnx.merge(graphdef, s)(x, v)).lower(state, xp, valid).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            extra["xla_temp"] = int(mem.temp_size_in_bytes)

        def call():
            jax.block_until_ready(compiled(state, xp, valid))

    else:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        attn, dists = hf_attention()
        xt = torch.from_numpy(x)
        fwd = (lambda h: old_forward(attn, h, dists)) if variant == "torch-broadcast" else (lambda h: attn(h, dists))

        def call():
            with torch.inference_mode():
                fwd(xt)

    call()  # warm-up: jax compiled above; first-call allocations out of the way
    exact = _reset_peak()
    before = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    call()
    times = [time.perf_counter() - t0]
    peak = (_status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    for _ in range(runs - 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "seconds": seconds,
        "rss_before": before,
        "peak": peak,
        "delta": peak - before,
        "peak_exact": exact,
        "time": statistics.median(times),
        **extra,
    }


def measure(variant: str, seconds: float, *, runs: int = 3, threads: int = 1) -> dict:
    """`child(...)` in a fresh process (JAX on CPU), so that each measurement has the process to itself."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, str(seconds), str(runs), str(threads)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"variant": variant, "seconds": seconds, "error": f"exit {out.returncode}: {out.stderr[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def study(
    seconds=DEFAULT_SECONDS, *, limit_gb: float = 6.0, runs: int = 3, threads: int = 1, progress: bool = True
) -> list[dict]:
    """One row per (length, variant); `torch-broadcast` rows over `limit_gb` are {"skipped": reason}."""
    rows = []
    for s in seconds:
        for variant in VARIANTS:
            if variant == "torch-broadcast" and intermediate_bytes(s) > limit_gb * 1e9:
                gb = intermediate_bytes(s) / 1e9
                rows.append(
                    {"variant": variant, "seconds": s, "skipped": f"6-D intermediate {gb:.1f} GB > {limit_gb:g} GB"}
                )
                continue
            if progress:
                print(f"... {s:g} s {variant}", file=sys.stderr, flush=True)
            rows.append(measure(variant, s, runs=runs, threads=threads))
    return rows


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e6:.2f} MB"


def markdown_table(rows: list[dict]) -> str:
    """Lengths down; per variant the peak RSS increase of one call, then the median ms per call."""
    by = {(r["seconds"], r["variant"]): r for r in rows}
    lengths = sorted({r["seconds"] for r in rows})
    short = {"torch-broadcast": "bcast", "torch-einsum": "einsum", "granite_jax": "jax"}
    head = ["audio", "blocks", "6-D product"] + [f"+RSS {short[v]}" for v in VARIANTS] + ["jax XLA temp"]
    head += [f"ms {short[v]}" for v in VARIANTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in lengths:
        mem, ms, temp = [], [], "-"
        for v in VARIANTS:
            r = by.get((s, v), {"error": "not run"})
            if "skipped" in r:
                mem.append("skipped")
                ms.append("-")
            elif "error" in r:
                mem.append("error")
                ms.append("-")
            else:
                mem.append(fmt_bytes(max(r["delta"], 0)))
                ms.append(f"{r['time'] * 1e3:.0f}" if r["time"] >= 0.01 else f"{r['time'] * 1e3:.1f}")
                temp = fmt_bytes(r["xla_temp"]) if "xla_temp" in r else temp
        cells = [f"{s:g} s", str(blocks(s)), fmt_bytes(intermediate_bytes(s)), *mem, temp, *ms]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['seconds']:g} s {r['variant']}: {r.get('skipped') or r['error']}" for r in rows if "delta" not in r]
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def header(threads: int, runs: int) -> str:
    import platform
    from importlib.metadata import version

    thr = f"{threads} thread{'s' * (threads != 1)}" if threads > 0 else "all threads"
    return textwrap.fill(
        f"One attention layer forward: hidden {HIDDEN}, {HEADS} heads x {DIM_HEAD}, context {CONTEXT}, batch 1, "
        f"fp32, CPU ({os.cpu_count()} cores, {thr}), torch {version('torch')}, jax {version('jax')}, Python "
        f"{platform.python_version()}. bcast: the old broadcast-and-sum, einsum: transformers' current code, "
        f"jax: granite_jax. Each cell its own process. +RSS: one call's peak RSS minus the RSS before "
        f"it; 6-D product: the broadcast form's intermediate (analytic); jax XLA temp: the compiled program's "
        f"temporary buffers; ms: median of {runs} calls after a warm-up.",
        110,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, nargs="+", default=list(DEFAULT_SECONDS))
    p.add_argument("--limit-gb", type=float, default=6.0, help="skip the broadcast variant past this intermediate")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads per process (0: the libraries' default)")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, s, runs, threads = args.child
        print(json.dumps(child(variant, float(s), int(runs), int(threads))))
        return []
    rows = study(args.seconds, limit_gb=args.limit_gb, runs=args.runs, threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n" + header(args.threads, args.runs) + "\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
