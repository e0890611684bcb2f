# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Memory study: the Shaw relative-position term
#
# Granite Speech's conformer attention works in blocks of `c = 200` frames (4 s of audio at 50 encoder frames
# per second) and adds a Shaw relative-position term to its logits: for query `i` and key `j` of a block,
# `q_i . E[dist(i, j)]`, where `E` is a `(c, c, dim_head)` table gathered once from the position embedding.
#
# The Hugging Face torch encoder used to compute it by broadcasting the queries against the whole table and
# summing over `dim_head`:
#
# ```python
# rel_pos_emb_expanded = rel_pos_emb.view([1, 1, 1] + list(rel_pos_emb.shape))           # (1, 1, 1, c, c, d)
# pos_attn = torch.sum(query_states.unsqueeze(-2) * rel_pos_emb_expanded, dim=-1) * self.scale
# ```
#
# with `query_states` of shape `(batch, blocks, heads, c, d)`. The product is a 6-D
# `(batch, blocks, heads, c, c, dim_head)` tensor, `dim_head = 128` times the size of the result: 164 MB per
# block per layer in fp32 at production width, so a 30-second batch of 8 (64 blocks) needs 10.5 GB for one
# layer's intermediate. transformers replaced it with an einsum that contracts over `d` without
# materialising the product (`"b h c d, c r d -> b h c r"` today, `"b m h c d, c r d -> b m h c r"` before
# batch and blocks were flattened). The broadcast form is not reconstructed here from memory: it is still in
# transformers' `GraniteSpeechConformerAttention.forward` as a comment above the einsum (printed in section 1),
# and the same expression is in downstream ports of the model such as vLLM's `granite_speech.py`.
# granite_jax's `Attention` also contracts the queries with the table in one matmul-shaped einsum (its lines
# are printed in section 1); it never forms a product of the queries with a `(c, c, dim_head)` table.
#
# This notebook measures one attention layer forward at production width (hidden 1024, 8 heads x 128,
# context 200, fp32, CPU, batch 1) for the three forms. The measuring code is `benchmarks/memory_study.py`;
# `python benchmarks/memory_study.py` runs the full-size study from the command line and prints the table.
#
# The test suite runs this notebook with `GRANITE_JAX_NOTEBOOK_SMALL=1` (4 s of audio; the skip path for
# lengths past the broadcast variant's limit is tested on its own).

# %%
import inspect
import os
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import granite_jax
from granite_jax.models.conformer_config import PRODUCTION

sys.path.insert(0, str(pathlib.Path(granite_jax.__file__).resolve().parents[1] / "benchmarks"))
import memory_study as ms

SMALL = os.environ.get("GRANITE_JAX_NOTEBOOK_SMALL") == "1"
SECONDS = (4,) if SMALL else ms.DEFAULT_SECONDS
LIMIT_GB = 0.2 if SMALL else 6.0  # the broadcast variant is not run where its 6-D intermediate exceeds this
RUNS = 1 if SMALL else 3
THREADS = 1  # one thread per measuring process: comparable numbers, and a quiet machine for everyone else

production = (PRODUCTION.hidden_dim, PRODUCTION.num_heads, PRODUCTION.dim_head, PRODUCTION.context_size)
assert production == (ms.HIDDEN, ms.HEADS, ms.DIM_HEAD, ms.CONTEXT)
print(f"lengths {SECONDS} s, broadcast limit {LIMIT_GB} GB, {RUNS} timed calls, {THREADS} thread(s)")

# %% [markdown]
# ## 1. The three expressions
# transformers' current forward, around the relative term. The commented lines are the old form; today's
# comment views the table as 5-D because batch and blocks are now one axis, and the product has the same size.

# %%
from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechConformerAttention

src = inspect.getsource(GraniteSpeechConformerAttention.forward).splitlines()
start = next(i for i, line in enumerate(src) if "shaw's relative" in line)
print("\n".join(src[start : start + 8]))

# %% [markdown]
# The old form as measured here (`old_forward` is the current forward with that einsum replaced), and
# granite_jax's einsums (`granite_jax.models.conformer.Attention`, as installed):

# %%
print(inspect.getsource(ms.old_pos_attn))
jax_src = inspect.getsource(granite_jax.models.conformer.Attention)
print("\n".join(line.strip() for line in jax_src.splitlines() if "jnp.einsum(" in line))

# %% [markdown]
# ## 2. They compute the same thing
# One layer with random weights, 5 s of audio (250 frames: a full block and a partly masked one), torch's
# weights copied into granite_jax's `Attention`:

# %%
import torch

attn, dists = ms.hf_attention(seed=0)
x = np.random.default_rng(0).standard_normal((1, 250, ms.HIDDEN)).astype(np.float32)
with torch.inference_mode():
    want = attn(torch.from_numpy(x), dists).numpy()
    old = ms.old_forward(attn, torch.from_numpy(x), dists).numpy()
xp, valid = ms.jax_inputs(x)
got = np.asarray(ms.jax_attention_from_torch(attn)(xp, valid))[:, : x.shape[1]]
for name, y in (("torch broadcast+sum", old), ("granite_jax", got)):
    print(f"{name:20s} max|y - einsum| / max|einsum| = {np.abs(y - want).max() / np.abs(want).max():.1e}")
assert np.abs(old - want).max() <= 1e-5 * np.abs(want).max()
assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
del attn, dists, x, want, old, xp, valid, got

# %% [markdown]
# ## 3. The size of the 6-D intermediate
# `batch x blocks x heads x c x c x dim_head x 4 bytes`, against the `(batch, blocks, heads, c, c)` logits that
# every variant produces. The intermediate exists for one layer at a time, so it sets the peak of a whole
# encoder forward.

# %%
cases = [(s, 1) for s in (*SECONDS, 300)] + [(30, 8)]
lines = ["| input | blocks | 6-D intermediate | (b, m, h, c, c) logits |", "|---|---|---|---|"]
for s, b in cases:
    lines.append(
        f"| {b} x {s:g} s | {b * ms.blocks(s)} | {ms.fmt_bytes(ms.intermediate_bytes(s, b))} "
        f"| {ms.fmt_bytes(ms.pos_attn_bytes(s, b))} |"
    )
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## 4. Measured: one attention layer forward
# Each (variant, length) runs in its own process (`ms.measure`): build the layer, one warm-up call (for JAX,
# after compiling ahead of time), then reset the process's peak-RSS mark (`/proc/self/clear_refs`), run one
# call and report its peak RSS minus the RSS just before it, then the median wall time of the timed calls.
# glibc is told to give every allocation of 1 MB or more its own mapping (`MALLOC_MMAP_THRESHOLD_`), so a
# call's temporaries show in RSS rather than reusing heap pages left by the warm-up. For granite_jax the table
# also gives XLA's compiled temporary-buffer size (`compiled.memory_analysis()`); the RSS increase can be
# below it, since RSS counts only the pages a call touches.

# %%
rows = ms.study(SECONDS, limit_gb=LIMIT_GB, runs=RUNS, threads=THREADS, progress=False)
print(ms.header(THREADS, RUNS))
display(Markdown(ms.markdown_table(rows)))

# %%
fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
styles = {"torch-broadcast": "o-", "torch-einsum": "s-", "granite_jax": "^-"}
for variant in ms.VARIANTS:
    done = [r for r in rows if r["variant"] == variant and "delta" in r]
    s = [r["seconds"] for r in done]
    ax_mem.plot(s, [max(r["delta"], 1) / 1e6 for r in done], styles[variant], label=ms.LABELS[variant])
    ax_time.plot(s, [r["time"] * 1e3 for r in done], styles[variant], label=ms.LABELS[variant])
    skipped = [r["seconds"] for r in rows if r["variant"] == variant and "skipped" in r]
    if skipped:
        ax_mem.plot(skipped, [ms.intermediate_bytes(t) / 1e6 for t in skipped], "x", color="C0", ms=9)
ax_mem.plot(SECONDS, [ms.intermediate_bytes(t) / 1e6 for t in SECONDS], "k:", label="6-D intermediate (analytic)")
ax_mem.axhline(LIMIT_GB * 1e3, color="grey", lw=0.8, ls="--", label=f"broadcast skipped above {LIMIT_GB:g} GB (x)")
ax_mem.set(xscale="log", yscale="log", xlabel="audio (s)", ylabel="peak RSS increase (MB)", title="Memory")
ax_time.set(xscale="log", yscale="log", xlabel="audio (s)", ylabel="ms per call", title="Time")
for ax in (ax_mem, ax_time):
    ax.set_xticks(SECONDS, [f"{s:g}" for s in SECONDS])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
ax_mem.legend(fontsize=8)
fig.suptitle("One attention layer forward, production width, batch 1, fp32, CPU")
fig.tight_layout()

# %% [markdown]
# ## Recorded full-size run
# `nice -n 19 python benchmarks/memory_study.py --json rows.json`, run once on 2026-11-25 (the machine's date)
# at commit `fd40a09` plus that day's uncommitted working tree, whose `granite_jax.models.conformer.Attention` computes
# the Shaw term as one `(2c - 1, dim_head)` matmul plus a relative shift (`relative_logits`). It took 3 min
# 15 s on a 2-core CPU VM while other jobs ran (load average 2 to 4), so treat the times as indicative. Load
# does not change the memory columns. The table is `ms.markdown_table` of that run's rows.
#
# One attention layer forward: hidden 1024, 8 heads x 128, context 200, batch 1, fp32, CPU (2 cores, 1 thread),
# torch 2.9.1, jax 0.10.2, Python 3.11.7. bcast: the old broadcast-and-sum, einsum: transformers' current code,
# jax: granite_jax. Each cell its own process. +RSS: one call's peak RSS minus the RSS before it; 6-D product:
# the broadcast form's intermediate (analytic); jax XLA temp: the compiled program's temporary buffers; ms:
# median of 3 calls after a warm-up.
#
# | audio | blocks | 6-D product | +RSS bcast | +RSS einsum | +RSS jax | jax XLA temp | ms bcast | ms einsum | ms jax |
# |---|---|---|---|---|---|---|---|---|---|
# | 10 s | 3 | 491.5 MB | 525.5 MB | 47.6 MB | 6.0 MB | 15.3 MB | 502 | 152 | 129 |
# | 30 s | 8 | 1.31 GB | 1.37 GB | 93.3 MB | 16.1 MB | 40.9 MB | 1310 | 380 | 408 |
# | 60 s | 15 | 2.46 GB | 2.55 GB | 157.1 MB | 107.2 MB | 76.7 MB | 3087 | 750 | 669 |
# | 120 s | 30 | 4.92 GB | 5.07 GB | 293.8 MB | 61.2 MB | 164.4 MB | 9843 | 1492 | 1451 |
# | 240 s | 60 | 9.83 GB | skipped | 567.3 MB | 122.7 MB | 328.5 MB | - | 2851 | 2765 |
#
# - 240 s torch-broadcast: 6-D intermediate 9.8 GB > 6 GB
#
# The broadcast form's peak RSS increase is its analytic 6-D product plus 3 to 7%: the product is nearly
# the whole cost of the layer, and it grows by 164 MB per 4-second block. At 120 s torch's einsum needs
# 294 MB, granite_jax 61 MB (XLA plans 164 MB of temporaries), and the broadcast form 5.07 GB. RSS figures of
# a few tens of MB are noisy (granite_jax's 60 s row is above its 120 s row). torch's einsum and granite_jax
# take about the same time, while the broadcast form is 3 to 7 times slower. At 240 s the product alone
# would be 9.8 GB, so the broadcast form was not run.
