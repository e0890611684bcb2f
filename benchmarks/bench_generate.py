"""Speech to text at the production 4.1-2b architecture: granite_jax `generate` beside transformers `generate`.

A random `GraniteSpeechForConditionalGeneration` (the released encoder, a 2-layer Q-Former, the 40-layer Granite
language model: hidden 2048, 16 / 4 kv heads, SwiGLU 8192, vocabulary 100353) is made with transformers, saved
and converted once; then each side runs each case in a fresh process (fp32 and bf16; batch 1 and 8; 10 s and
30 s clips) and reports prefill time, per-token decode time, tokens/s, RTFx and peak RSS. Both sides generate
exactly `--new-tokens` tokens (eos is set to an id the random model never makes) and the token ids are compared.
The jax worker also times exact speculative decoding at its two bounds: drafted by greedy's own output (the most
it can gain) and by a draft that never agrees with the model (what it costs when the CTC head is wrong).
The table also prints the time to read the language model's weights once from memory (weight bytes / this
machine's read rate, measured as a one-row fp32 product over a 1 GiB weight): a batch-1 decode step cannot be
faster on CPU. Peak RSS is each side's after its greedy run; a speculative row's is the process's after it too.
On a machine whose speed drifts, `--repeats N` times each side's greedy call N times and reports the fastest (the
speculative rows stay one call each, after a warm-up), and `--rounds N` runs each side's process N times,
alternating torch and jax, and keeps each side's fastest (a slow spell of minutes then hits both sides).

    python benchmarks/bench_generate.py                                   # all cases (about an hour on 2 cores)
    python benchmarks/bench_generate.py --cases 10s --dtypes float32 --lm-layers 4 --new-tokens 16   # quick
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import exit_on_sigterm
from bench_encoder import cpu_model, peak_rss_bytes, peak_worker, version  # noqa: E402

from granite_jax.testing.hf_llm import RELEASED_TEXT  # noqa: E402

PROD_TEXT = RELEASED_TEXT
CASES = {"10s": (1, 10.0), "30s": (1, 30.0), "8x10s": (8, 10.0), "8x30s": (8, 30.0)}


def read_bandwidth() -> float:
    """Bytes/s at which a jitted one-row fp32 product reads a 1 GiB weight (2048 x 131072), best of 3: what a
    batch-1 decode step does with each weight it uses. (A jitted sum over the same bytes reads about 40% slower
    on XLA CPU, and would understate the floor.)"""
    import jax
    import jax.numpy as jnp

    w = jnp.ones((2048, 1 << 17), jnp.float32)
    x = jnp.ones((1, 2048), jnp.float32)
    product = jax.jit(jnp.dot)
    product(x, w).block_until_ready()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        product(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


def waves(case: str) -> list[np.ndarray]:
    from granite_jax.data import clip_path
    from granite_jax.frontend.audio import load_audio

    batch, seconds = CASES[case]
    base = load_audio(clip_path("numbers"))
    n = int(seconds * 16000)
    return [np.roll(np.tile(base, -(-n // len(base)))[:n], 997 * i).astype(np.float32) for i in range(batch)]


def audio_seconds(case: str) -> float:
    batch, seconds = CASES[case]
    return batch * seconds


def prepare(directory: str, lm_layers: int) -> None:
    """The HF checkpoint (random, perturbed) and its conversion, each in its own process."""
    from granite_jax.cli.demo import DEMO_PROJECTOR
    from granite_jax.models.conformer_config import PRODUCTION
    from granite_jax.testing.hf_llm import make_hf_speech_checkpoint, train_llm_tokenizer

    text = dict(PROD_TEXT, num_hidden_layers=lm_layers)
    vocab = text.pop("vocab_size")
    tokenizer = train_llm_tokenizer(1000)
    model, _ = make_hf_speech_checkpoint(
        PRODUCTION, f"{directory}/hf", tokenizer, projector=DEMO_PROJECTOR, text=dict(text, vocab_size=vocab), tie=False
    )
    never = vocab - 1  # eos: an id past the tokenizer, which the random model is not pushed towards
    with open(f"{directory}/hf/generation_config.json") as f:
        gen = json.load(f)
    gen.update(eos_token_id=never, pad_token_id=never)
    with open(f"{directory}/hf/generation_config.json", "w") as f:
        json.dump(gen, f)
    del model


def drafts_for(greedy: list[list[int]]) -> dict[str, list[list[int]]]:
    """Speculative decoding's bounds: a draft that is greedy's own output (every pass accepts its whole chunk),
    and one that never agrees with the model (a token absent from greedy's output: every pass is a greedy step)."""
    made = {t for row in greedy for t in row}
    absent = min(set(range(len(made) + 1)) - made)  # some id among the first len(made) + 1 is never made
    return {"right draft": greedy, "wrong draft": [[absent] * len(row) for row in greedy]}


def timed_speculative(m, w: list[np.ndarray], new_tokens: int, drafts: list[list[int]]) -> dict:
    """End to end as `generate` does it (encode, prompt, prefill, the loop) with these drafts, after a warm-up."""
    gen = m._generator

    def once() -> tuple[float, list[list[int]], dict]:
        t0 = time.perf_counter()
        res = m.encode(w)
        ids = gen.prompt_ids([None] * len(w), res.embedding_counts, new_tokens)
        tokens, stats = gen.speculative(ids, res.audio_embeddings, new_tokens, drafts)
        return time.perf_counter() - t0, [t.tolist() for t in tokens], stats

    once()
    total, ids, stats = once()
    kept = ("decode_seconds", "steps", "verify_steps", "acceptance")
    return dict(total=total, ids=ids, **{k: stats[k] for k in kept})


def worker(
    side: str, directory: str, case: str, dtype: str, new_tokens: int, device: str = "cpu", repeats: int = 1
) -> dict:
    """One side, one case, in this process: timings (the fastest of `repeats` greedy calls), ids, peak RSS."""
    w = waves(case)
    audio = sum(len(x) for x in w) / 16000
    if side == "jax":
        import jax

        import granite_jax

        m = granite_jax.load(f"{directory}/gj", dtype=dtype)
        m.generate(w, max_new_tokens=new_tokens)  # compile
        total = float("inf")
        for _ in range(repeats):  # the fastest call, and its own prefill and decode times
            t0 = time.perf_counter()
            out = m.generate(w, max_new_tokens=new_tokens)
            seconds = time.perf_counter() - t0
            if seconds < total:
                total, r = seconds, out
        jax.block_until_ready(m.parameters()[0])
        ids = [t.tolist() for t in r.token_ids]
        prefill, decode = r.stats["prefill_seconds"], r.stats["decode_seconds"]
        encode = total - prefill - decode
        peak = peak_rss_bytes()  # greedy's, as torch's side runs greedy alone
        speculative = {name: timed_speculative(m, w, new_tokens, draft) for name, draft in drafts_for(ids).items()}
        for r in speculative.values():
            r["peak_rss"] = peak_rss_bytes()  # the process's, its speculative programs compiled and run
    else:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        proc = transformers.GraniteSpeechProcessor.from_pretrained(f"{directory}/hf")
        model = (
            transformers.GraniteSpeechForConditionalGeneration.from_pretrained(
                f"{directory}/hf", dtype=getattr(torch, dtype)
            )
            .eval()
            .to(device)
        )
        chat = [{"role": "user", "content": "<|audio|>can you transcribe the speech into a written format?"}]
        text = proc.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        proc.tokenizer.padding_side = "left"
        inputs = proc([text] * len(w), w, return_tensors="pt").to(device)
        kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
        with torch.inference_mode():
            model.generate(**inputs, **dict(kw, min_new_tokens=1, max_new_tokens=2))  # warm-up
            prefill = total = float("inf")
            for _ in range(repeats):  # the fastest of each
                t0 = time.perf_counter()
                model.generate(**inputs, **dict(kw, min_new_tokens=1, max_new_tokens=1))
                prefill = min(prefill, time.perf_counter() - t0)  # encoder, projector and prompt: the first token
                t0 = time.perf_counter()
                out = model.generate(**inputs, **kw)
                total = min(total, time.perf_counter() - t0)
        ids = [row[inputs["input_ids"].shape[1] :].tolist() for row in out.cpu()]
        decode, encode, speculative = total - prefill, 0.0, {}
        peak = peak_rss_bytes()
    return dict(
        speculative=speculative,
        total=total,
        prefill=prefill,
        encode=encode,
        decode=decode,
        per_token=decode / max(1, new_tokens - 1),
        tokens_per_s=len(w) * new_tokens / total,
        rtfx=audio / total,
        peak_rss=peak,
        ids=ids,
    )


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="10s,30s,8x10s,8x30s")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lm-layers", type=int, default=40)
    p.add_argument("--work-dir", default=None, help="keep the checkpoints here (made once, reused)")
    p.add_argument("--torch-device", default="cpu", help="torch's device (cuda on a GPU machine)")
    p.add_argument(
        "--rounds", type=int, default=1, help="processes per side and case, alternating torch and jax; the fastest kept"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="greedy calls per side and case, the fastest reported (a noisy machine)"
    )
    p.add_argument("--worker", nargs=5, metavar=("SIDE", "DIR", "CASE", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peaks:
        print(json.dumps(peak_worker()))
        return
    if args.prepare:
        prepare(args.prepare, args.lm_layers)
        print("{}")
        return
    if args.worker:
        side, directory, case, dtype, tokens = args.worker
        print(json.dumps(worker(side, directory, case, dtype, int(tokens), args.torch_device, args.repeats)))
        return
    if args.work_dir:
        report(args, args.work_dir)
    else:  # the checkpoints (26 GB at 40 layers in fp32) go when the run ends
        with tempfile.TemporaryDirectory(prefix="bench_generate-") as work:
            report(args, work)


def report(args: argparse.Namespace, work: str) -> None:
    """Make (once) and convert the checkpoint in `work`, then print the table: each side, each case, its own process."""
    me = [sys.executable, os.path.abspath(__file__)]
    if not os.path.exists(f"{work}/gj"):
        t0 = time.perf_counter()
        run([*me, "--prepare", work, "--lm-layers", str(args.lm_layers)])
        convert = os.path.join(os.path.dirname(sys.executable), "granite-jax-convert")  # this venv's, on PATH or not
        subprocess.run([convert, f"{work}/hf", f"{work}/gj", "--quiet"], check=True)
        print(f"checkpoint made and converted in {time.perf_counter() - t0:.0f} s ({work})")
    peaks = run([*me, "--peaks"])
    bandwidth = read_bandwidth()
    lm_params = sum(
        n
        for n in [
            PROD_TEXT["vocab_size"] * PROD_TEXT["hidden_size"],  # the head (a step reads one embedding row)
            args.lm_layers * PROD_TEXT["hidden_size"] * (2 * 2048 + 2 * 512 + 3 * PROD_TEXT["intermediate_size"]),
        ]
    )
    print(f"machine: {cpu_model()}; {os.cpu_count()} cores")
    print(
        f"peaks this run: jnp.dot fp32 {peaks['jax_gflops']:.0f} GFLOP/s, torch.matmul {peaks['torch_gflops']:.0f}; "
        f"memory read {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"jax {version('jax')}, torch {version('torch')}, transformers {version('transformers')}; "
        f"language model {args.lm_layers} layers, {lm_params / 1e9:.2f}B parameters read per step; "
        f"{args.new_tokens} new tokens"
    )
    print()
    print(
        "| case | dtype | side | prefill s | per token s | weight read s | tokens/s | RTFx | total s | peak RSS GB | "
        "speed-up | ids equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        read = lm_params * (2 if dtype == "bfloat16" else 4) / bandwidth
        for case in args.cases.split(","):
            res = {}
            for _ in range(args.rounds):  # the sides alternate, process by process; each side's fastest is kept
                for s in ("torch", "jax"):
                    r = run(
                        [*me, "--worker", s, work, case, dtype, str(args.new_tokens)]
                        + ["--torch-device", args.torch_device, "--repeats", str(args.repeats)]
                    )
                    if s not in res or r["total"] < res[s]["total"]:
                        res[s] = r
            same = res["jax"]["ids"] == res["torch"]["ids"]
            for side in ("torch", "jax"):
                r = res[side]
                up = res["torch"]["total"] / r["total"] if side == "jax" else 1.0
                print(
                    f"| {case} | {dtype} | {side} | {r['prefill']:.2f} | {r['per_token']:.3f} | {read:.3f} | "
                    f"{r['tokens_per_s']:.2f} | {r['rtfx']:.2f} | {r['total']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
                    f"{up:.2f}x | {same if side == 'jax' else ''} |",
                    flush=True,
                )
            for name, r in res["jax"]["speculative"].items():
                b = len(r["ids"])
                print(
                    f"| {case} | {dtype} | jax, {name} ({r['steps']} passes, {r['verify_steps']} wide) | | "
                    f"{r['decode_seconds'] / max(1, args.new_tokens - 1):.3f} | {read:.3f} | "
                    f"{b * args.new_tokens / r['total']:.2f} | {audio_seconds(case) / r['total']:.2f} | "
                    f"{r['total']:.1f} | {r['peak_rss'] / 1e9:.2f} | {res['torch']['total'] / r['total']:.2f}x | "
                    f"greedy's: {r['ids'] == res['jax']['ids']} |",
                    flush=True,
                )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
