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
# # granite_jax quick start
#
# From a speech clip to the embeddings Granite Speech feeds its language model, all in JAX: convert a
# checkpoint, load it, encode a clip (log-mel -> conformer encoder -> Q-Former projector in one compiled
# call), check every stage against the PyTorch reference, and look inside the encoder. No downloads: the
# checkpoint is made here with transformers (random weights at the granite-speech-4.1-2b encoder
# architecture), and the clip is one of the espeak-ng sentences bundled with granite_jax. With a real
# checkpoint, start at step 2 with its directory (or hub id).
#
# The test suite runs this notebook with `GRANITE_JAX_NOTEBOOK_SMALL=1` (1 layer).

# %%
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import granite_jax
from granite_jax.cli.demo import DEMO_PROJECTOR
from granite_jax.data import CLIPS, clip_path
from granite_jax.models.conformer_config import PRODUCTION
from granite_jax.testing.hf import make_hf_full_checkpoint

SMALL = os.environ.get("GRANITE_JAX_NOTEBOOK_SMALL") == "1"
cfg = dataclasses.replace(PRODUCTION, num_layers=1 if SMALL else 16)
work = tempfile.mkdtemp()
print(cfg)

# %% [markdown]
# ## 1. A Hugging Face checkpoint
# `make_hf_full_checkpoint` builds a whole `GraniteSpeechForConditionalGeneration` with transformers
# (encoder, Q-Former projector, a tiny language model), perturbs every encoder and projector parameter and
# buffer, and calls `save_pretrained`. It returns the torch model for comparison.

# %%
reference = make_hf_full_checkpoint(cfg, f"{work}/hf", seed=0, projector=DEMO_PROJECTOR)
sorted(os.listdir(f"{work}/hf"))

# %% [markdown]
# ## 2. Convert with `granite-jax-convert`
# Only the encoder and projector tensors are read; the language model is left alone.

# %%
cli = os.path.join(os.path.dirname(sys.executable), "granite-jax-convert")
subprocess.run([cli, f"{work}/hf", f"{work}/granite_jax"], check=True)
sorted(os.listdir(f"{work}/granite_jax"))

# %% [markdown]
# ## 3. Audio and its log-mel features
# `load_audio` reads WAV / FLAC / OGG, mixes to mono and resamples to 16 kHz. `extract_features` is a JAX
# port of HF's `GraniteSpeechFeatureExtractor`: 80 mel bands every 10 ms, pairs of frames stacked into
# 160-wide encoder frames (50 per second).

# %%
waves = {name: granite_jax.load_audio(clip_path(name)) for name in CLIPS}
features, lengths = granite_jax.extract_features(list(waves.values()))
print({name: f"{len(w) / 16000:.2f} s" for name, w in waves.items()}, "-> features", features.shape, lengths)

wave, n = waves["fox"], int(lengths[0])
mel = np.asarray(features[0, :n]).reshape(2 * n, 80)  # undo the stacking: (mel frames, 80 bands)
fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
axes[0].plot(np.arange(len(wave)) / 16000, wave, lw=0.4)
axes[0].set(title="fox.flac (espeak-ng)", ylabel="amplitude")
im = axes[1].imshow(mel.T, aspect="auto", origin="lower", cmap="magma", extent=(0, 2 * n / 100, 0, 80))
axes[1].set(title="log-mel features (granite_jax.extract_features)", xlabel="seconds", ylabel="mel band")
fig.colorbar(im, ax=axes, fraction=0.02)
plt.show()

# %% [markdown]
# ## 4. Load and encode
# `encode` runs log-mel, the encoder and the projector under one `jax.jit`. Each row of a batch is exact
# as if encoded alone (`batch_mode="hf"` reproduces HF's padded-batch behaviour instead).

# %%
model = granite_jax.load(f"{work}/granite_jax")
print(model)
t0 = time.perf_counter()
result = model.encode(list(waves.values()))
jax.block_until_ready(result.audio_embeddings)
print(f"first call (compiles): {time.perf_counter() - t0:.2f} s")
t0 = time.perf_counter()
result = model.encode(list(waves.values()))
jax.block_until_ready(result.audio_embeddings)
print(f"second call: {time.perf_counter() - t0:.2f} s")
print("hidden states", result.hidden_states.shape, "valid frames", result.lengths)
print("audio embeddings", result.audio_embeddings.shape, "valid rows", result.embedding_counts)

# %% [markdown]
# ## 5. Against the PyTorch reference
# Each clip through HF's extractor (torchaudio), encoder and projector (`get_audio_features`), alone.

# %%
import torch  # noqa: E402

try:
    import transformers

    extractor = transformers.GraniteSpeechFeatureExtractor()
except ImportError:  # no torchaudio: feed HF our features instead
    extractor = None


def rel(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


for i, (name, w) in enumerate(waves.items()):
    n, e = int(result.lengths[i]), int(result.embedding_counts[i])
    feats = (
        extractor([w])["input_features"] if extractor else torch.from_numpy(np.asarray(result.features[i : i + 1, :n]))
    )
    with torch.no_grad():
        out = reference.model.get_audio_features(feats)
    print(
        f"{name}: features max abs diff {np.abs(np.asarray(result.features[i, :n]) - feats[0].numpy()).max():.1e}, "
        f"hidden {rel(result.hidden_states[i, :n], out.last_hidden_state[0].numpy()):.1e}, "
        f"embeddings {rel(result.audio_embeddings[i, :e], out.pooler_output[0, :e].numpy()):.1e} (relative)"
    )

# %% [markdown]
# ## 6. Inside the encoder
# The NNX module mirrors the torch tree, with the 16 blocks stacked into one (a leading layer axis, so that
# the encoder compiles one block and `lax.scan`s it). `output_hidden_states=True` returns every layer's
# output, as HF's `output_hidden_states` does (the input projection, then each block), and `enc.layer(i)`
# gives block i as a module of its own, so probing is plain Python.

# %%
import jax.numpy as jnp  # noqa: E402

enc = model.model
_, states = model.encode_features(features[:1, :n], output_hidden_states=True)
norms = [np.linalg.norm(np.asarray(states[i, 0]), axis=-1) for i in range(1, cfg.num_layers + 1)]
# the same, block by block: run block i on the previous one's output (with the self-conditioning)
h = enc.input_linear(features[:1, :n])
valid = jnp.ones(h.shape[:2], bool)
for i in range(1, cfg.num_layers + 1):
    h = enc.layer(i - 1)(h, valid)
    if i == cfg.self_conditioning_layer:
        h, _ = enc.self_condition(h)
print("block by block equals output_hidden_states:", float(jnp.abs(h - states[-1]).max()))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
im = axes[0].imshow(np.asarray(result.hidden_states[0, :n, :128]).T, aspect="auto", origin="lower", cmap="magma")
axes[0].set(title="final hidden states, fox (first 128 channels)", xlabel="encoder frame (20 ms)", ylabel="channel")
fig.colorbar(im, ax=axes[0])
for i, v in enumerate(norms, start=1):
    axes[1].plot(v, lw=0.8, label=f"block {i}")
axes[1].set(title="per-frame activation norm by block", xlabel="encoder frame", ylabel="L2 norm")
if len(norms) <= 4:
    axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 7. The CTC head
# `ctc_logits` applies the encoder's character head; `ctc_greedy` collapses repeats and drops blanks. With
# random weights the "transcript" is noise; with a released checkpoint it is the clip's text.

# %%
model.ctc_greedy(result.hidden_states, result.lengths)

# %% [markdown]
# The checkpoints and outputs made above live in a temporary folder; remove it when done.

# %%
import shutil  # noqa: E402

shutil.rmtree(work)
