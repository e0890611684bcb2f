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
# # Speech to text with Granite Speech 4.x in JAX
#
# The whole speech LLM: audio -> encoder -> projector -> a chat prompt with the audio merged in -> the Granite
# language model, with a static KV cache and the decode loop inside one jit. This notebook builds a prompt,
# checks generation against transformers' `generate` token for token, shows what speculative decoding from
# the encoder's own CTC head buys, and measures tokens/s against batch size.
#
# No downloads: the checkpoint is made here with transformers (random weights; a small language model at the
# released models' head layout), the tokenizer is trained here with `tokenizers` and given a Granite-style chat
# template. With a real checkpoint, `granite_jax.load("./gs41")` and start at step 2. The test suite runs this
# notebook with `GRANITE_JAX_NOTEBOOK_SMALL=1`.

# %%
import dataclasses
import os
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np

import granite_jax
from granite_jax.convert import convert_checkpoint
from granite_jax.data import clip_path
from granite_jax.testing import TINY
from granite_jax.testing.hf_llm import hf_generate, make_hf_speech_checkpoint, train_llm_tokenizer

SMALL = os.environ.get("GRANITE_JAX_NOTEBOOK_SMALL") == "1"
work = tempfile.mkdtemp()

# %% [markdown]
# ## 1. A checkpoint, converted with its language model

# %%
encoder = dataclasses.replace(TINY, input_dim=160, num_layers=2 if SMALL else 4, hidden_dim=64, num_heads=4)
text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2 if SMALL else 4, num_attention_heads=8)
tokenizer = train_llm_tokenizer(400)
hf_model, processor = make_hf_speech_checkpoint(
    encoder, f"{work}/hf", tokenizer, projector=dict(window_size=15, downsample_rate=5), text=text, tie=False
)
convert_checkpoint(f"{work}/hf", f"{work}/gj")
model = granite_jax.load(f"{work}/gj")
print(model)
print(sorted(os.listdir(f"{work}/gj")))

# %% [markdown]
# ## 2. The prompt
#
# The checkpoint's chat template, rendered as `apply_chat_template(..., add_generation_prompt=True)` renders
# it; the one `<|audio|>` becomes as many audio tokens as the projector makes embeddings for the clip.

# %%
speech = [granite_jax.load_audio(clip_path(c)) for c in ("fox", "numbers", "report")]
prompts = model._generator.prompts
print(prompts.render("can you transcribe the speech into a written format?"))
counts = model.encode(speech).embedding_counts
ids = prompts.ids(None, counts[0])
print(f"{len(ids)} prompt tokens, {counts[0]} of them audio")

# %% [markdown]
# ## 3. Generation against transformers, token for token

# %%
result = model.generate(speech, max_new_tokens=24)
for wave, got in zip(speech, result.token_ids, strict=True):
    want = hf_generate(hf_model, processor, wave, max_new_tokens=24)
    print(got.tolist() == want, got.tolist()[:12])
beams = model.generate(speech, max_new_tokens=24, num_beams=3)
print("beam search scores:", np.round(beams.scores, 3))

# %% [markdown]
# ## 4. Speculative decoding
#
# Where the draft agrees with the model's last token, its next 8 tokens are verified in one wider pass; the
# longest prefix equal to the model's own argmax is kept, then the model's next token. Elsewhere a step is
# greedy's. The tokens never change; the number and width of the steps do. A draft that is always right is
# the upper bound, one that is always wrong the floor (greedy's steps, none wider).

# %%
gen = model._generator
res = model.encode(speech)
prompt_ids = gen.prompt_ids([None] * len(speech), res.embedding_counts, 24)
greedy = [t.tolist() for t in result.token_ids]
drafts = {
    "right": greedy,
    "half right": [d[: len(d) // 2] + [5] * (len(d) - len(d) // 2) for d in greedy],
    "wrong": [[5] * 24 for _ in greedy],
    "CTC head": gen.drafts(model, res),
}
steps, wide = {}, {}
for name, draft in drafts.items():
    tokens, stats = gen.speculative(prompt_ids, res.audio_embeddings, 24, draft)
    assert [t.tolist() for t in tokens] == greedy, name
    steps[name], wide[name] = stats["steps"], stats["verify_steps"]
print("steps:", steps, "of them wide:", wide)
plt.figure(figsize=(6, 3))
plt.bar(list(steps), [steps[k] - wide[k] for k in steps], color="tab:blue", label="one-token steps")
plt.bar(
    list(steps),
    list(wide.values()),
    bottom=[steps[k] - wide[k] for k in steps],
    color="tab:orange",
    label="verification passes (9 tokens)",
)
plt.legend()
plt.ylabel("decode steps for 24 tokens")
plt.title("speculative decoding: same tokens, fewer steps with a better draft")
plt.show()

# %% [markdown]
# ## 5. Tokens per second against batch size (this machine, this small model)

# %%
sizes = [1, 2] if SMALL else [1, 2, 4, 8, 16]
rates = []
for b in sizes:
    batch = [speech[i % 3] for i in range(b)]
    model.generate(batch, max_new_tokens=16)  # compile this bucket
    t0 = time.perf_counter()
    r = model.generate(batch, max_new_tokens=16)
    rates.append(sum(len(t) for t in r.token_ids) / (time.perf_counter() - t0))
plt.figure(figsize=(6, 3))
plt.plot(sizes, rates, "o-")
plt.xlabel("batch size")
plt.ylabel("generated tokens / s")
plt.title("one jit per decode loop: the batch shares every weight read")
plt.show()

# %% [markdown]
# The checkpoints and outputs made above live in a temporary folder; remove it when done.

# %%
import shutil  # noqa: E402

shutil.rmtree(work)
