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
# # Training and fine-tuning a Granite Speech encoder in JAX
#
# A CTC recogniser trained from scratch on a synthetic corpus, then adapted with LoRA to a voice it never
# heard, then handed back to transformers. Everything is made here: the corpus is spoken digit strings
# from espeak-ng in six voices at several rates and noise levels (`granite_jax.testing.speech`), and the
# encoder is a small 4.x conformer with a character CTC head (`chr(id)`, as the released heads).
#
# The test suite runs this notebook with `GRANITE_JAX_NOTEBOOK_SMALL=1` (a tiny corpus, one batch of it, and a
# few steps, so that it only checks that everything runs); `benchmarks/RESULTS.md` records a full-size run.

# %%
import json
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

import granite_jax
from granite_jax import train
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.testing.speech import make_digit_corpus

SMALL = os.environ.get("GRANITE_JAX_NOTEBOOK_SMALL") == "1"
work = tempfile.mkdtemp()
corpus = make_digit_corpus(
    os.path.join(work, "digits"), n_train=16 if SMALL else 600, n_eval=8 if SMALL else 100, n_heldout=8 if SMALL else 60
)
with open(corpus["train"]) as f:
    lines = f.read().splitlines()
print(len(lines), "training utterances, e.g.", lines[0])

# %% [markdown]
# ## 1. Train from scratch
#
# `new_checkpoint` writes a randomly initialised encoder in granite_jax's format; `finetune` (the Python
# face of `granite-jax finetune`) trains it with AdamW, warmup and a cosine schedule, batches of similar
# durations, the intermediate CTC loss at the self-conditioning layer, and evaluates greedy CTC text with
# jiwer. Its state goes to `DST.train/` (orbax checkpoints, `metrics.jsonl`), so a killed run resumes.

# %%
cfg = EncoderConfig(
    input_dim=160,
    num_layers=4,
    hidden_dim=128,
    feedforward_mult=2,
    num_heads=4,
    dim_head=32,
    output_dim=128,  # ASCII: the head's ids are character codes
    context_size=64,
    max_pos_emb=128,
    dropout=0.1,
    conv_kernel_size=7,
)
train.new_checkpoint(cfg, os.path.join(work, "init"), seed=0)
steps = 3 if SMALL else 1500
summary = train.finetune(
    os.path.join(work, "init"),
    corpus["train"],
    os.path.join(work, "scratch"),
    eval_manifest=corpus["eval"],
    train=train.TrainConfig(learning_rate=2e-3, warmup_steps=min(100, steps // 5), total_steps=steps, mid_weight=0.3),
    run=train.RunConfig(steps=steps, batch_size=16, eval_every=steps if SMALL else steps // 10, save_every=steps),
    progress=not SMALL,
)
print(summary)

# %%
with open(os.path.join(work, "scratch.train", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
loss = [(r["step"], r["loss"], r["mid"]) for r in records if "loss" in r]
cer = [(r["step"], r["eval_cer"]) for r in records if "eval_cer" in r]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.plot([s for s, _, _ in loss], [v for _, v, _ in loss], label="training loss (mixed)")
a.plot([s for s, _, _ in loss], [v for _, _, v in loss], label="intermediate CTC loss", alpha=0.6)
a.set(xlabel="step", ylabel="CTC loss per label", yscale="log", title="from scratch")
a.legend()
b.plot([s for s, _ in cer], [100 * v for _, v in cer], "o-")
b.set(xlabel="step", ylabel="held-out CER %", title="greedy CTC, the eval voices")
plt.tight_layout()

# %% [markdown]
# ## 2. Fine-tune with LoRA on a voice the model never heard
#
# The held-out split is read by a voice that is in no training utterance. Rank-4 LoRA adapters on the
# attention and feed-forward projections train alone (BatchNorm kept on its running statistics), then
# `finetune` merges them into the weights: the saved model has the original's keys.

# %%
heldout = train.data.read_manifest(corpus["heldout"])
half = len(heldout) // 2
adapt, test = os.path.join(work, "adapt.json"), os.path.join(work, "test.json")
for path, part in ((adapt, heldout[:half]), (test, heldout[half:])):
    with open(path, "w") as f:
        for u in part:
            f.write(json.dumps({"audio_filepath": u.audio_filepath, "text": u.text, "duration": u.duration}) + "\n")
scratch = granite_jax.load(os.path.join(work, "scratch"))
before = train.evaluate(scratch.model, scratch, train.data.read_manifest(test))
lora_steps = 2 if SMALL else 300
tuned = train.finetune(
    os.path.join(work, "scratch"),
    adapt,
    os.path.join(work, "tuned"),
    eval_manifest=test,
    train=train.TrainConfig(learning_rate=3e-3, total_steps=lora_steps, batch_norm="frozen"),
    run=train.RunConfig(steps=lora_steps, batch_size=4, save_every=lora_steps, lora_rank=4, seed=1),
    progress=not SMALL,
)
print(f"held-out voice CER: {100 * before['cer']:.1f}% before, {100 * tuned['eval_cer']:.1f}% after LoRA")
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(["before", "after LoRA"], [100 * before["cer"], 100 * tuned["eval_cer"]])
ax.set(ylabel="CER %", title="a voice absent from training")

# %% [markdown]
# ## 3. Back to transformers
#
# `export_hf` writes a `GraniteSpeechCTCEncoder` directory (with `base=` an original full checkpoint, the
# whole `GraniteSpeechForConditionalGeneration`); transformers loads it, and its CTC head gives the same
# greedy text.

# %%
import torch  # noqa: E402
import transformers  # noqa: E402

model = granite_jax.load(os.path.join(work, "tuned"))
granite_jax.export_hf(model, os.path.join(work, "hf"))
hf = transformers.GraniteSpeechCTCEncoder.from_pretrained(os.path.join(work, "hf")).eval()
utts = train.data.read_manifest(test)[:4]
waves = [granite_jax.load_audio(u.audio_filepath) for u in utts]
res = model.encode(waves)
jax_text = model.ctc_greedy(res.hidden_states, res.lengths)
torch_text = []
for i, n in enumerate(res.lengths):
    with torch.no_grad():
        h = hf(torch.from_numpy(np.array(res.features[i : i + 1, :n]))).last_hidden_state
        ids = hf.out(h).argmax(-1)[0].numpy()
    torch_text += granite_jax.ctc_greedy_decode(ids[None], [n])
for u, a, b in zip(utts, jax_text, torch_text, strict=True):
    print(f"{u.text!r:40} jax {a!r:40} torch {b!r}")
assert jax_text == torch_text

# %% [markdown]
# The checkpoints and outputs made above live in a temporary folder; remove it when done.

# %%
import shutil  # noqa: E402

shutil.rmtree(work)
