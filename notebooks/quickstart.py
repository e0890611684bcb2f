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
# Convert a Granite Speech checkpoint, load it, encode, check against the PyTorch reference, and look
# inside the encoder. No downloads: the checkpoint is made here with transformers (random weights at
# the granite-speech-4.1-2b encoder architecture). With a real checkpoint, start at step 2 with its
# directory (or hub id).
#
# The test suite runs this notebook with `GRANITE_JAX_NOTEBOOK_SMALL=1` (2 layers, short input).

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
from granite_jax.config import PRODUCTION
from granite_jax.reference import make_hf_checkpoint

SMALL = os.environ.get("GRANITE_JAX_NOTEBOOK_SMALL") == "1"
cfg = dataclasses.replace(PRODUCTION, num_layers=2 if SMALL else 16)
seconds = 3 if SMALL else 10
work = tempfile.mkdtemp()
print(cfg)

# %% [markdown]
# ## 1. A Hugging Face checkpoint
# `make_hf_checkpoint` builds `GraniteSpeechCTCEncoder` with transformers, perturbs every parameter and
# buffer, and calls `save_pretrained`. It returns the torch module for comparison.

# %%
reference = make_hf_checkpoint(cfg, f"{work}/hf", seed=0)
sorted(os.listdir(f"{work}/hf"))

# %% [markdown]
# ## 2. Convert with `granite-jax-convert`

# %%
cli = os.path.join(os.path.dirname(sys.executable), "granite-jax-convert")
subprocess.run([cli, f"{work}/hf", f"{work}/granite_jax"], check=True)
sorted(os.listdir(f"{work}/granite_jax"))

# %% [markdown]
# ## 3. Load and encode
# `encode_features` takes log-mel features `(batch, frames, 160)` at 50 frames per second; `lengths`
# makes a padded batch exact per utterance.

# %%
model = granite_jax.load(f"{work}/granite_jax")
print(model)
rng = np.random.default_rng(0)
features = rng.standard_normal((2, seconds * 50, cfg.input_dim)).astype(np.float32)
lengths = [seconds * 50, seconds * 30]
t0 = time.perf_counter()
hidden = jax.block_until_ready(model.encode_features(features, lengths=lengths))
print(f"first call (compiles): {time.perf_counter() - t0:.2f} s")
t0 = time.perf_counter()
hidden = jax.block_until_ready(model.encode_features(features, lengths=lengths))
print(f"second call: {time.perf_counter() - t0:.2f} s, output {hidden.shape}")

# %% [markdown]
# ## 4. Against the PyTorch reference
# Row 1 is compared with the reference run on that utterance alone (HF has no padding mask).

# %%
import torch  # noqa: E402

with torch.no_grad():
    want = [
        reference(torch.from_numpy(features[i : i + 1, :n])).last_hidden_state[0].numpy() for i, n in enumerate(lengths)
    ]
for i, n in enumerate(lengths):
    got = np.asarray(hidden[i, :n])
    print(f"row {i}: max|jax - torch| / max|torch| = {np.abs(got - want[i]).max() / np.abs(want[i]).max():.2e}")

# %% [markdown]
# ## 5. Inside the encoder
# The NNX module mirrors the torch tree, so probing a layer is plain Python: run the blocks one by one.

# %%
import jax.numpy as jnp  # noqa: E402

enc = model.model
x = jnp.asarray(features[:1])
valid = jnp.ones(x.shape[:2], bool)
pad = -x.shape[1] % cfg.context_size
xp, vp = jnp.pad(x, ((0, 0), (0, pad), (0, 0))), jnp.pad(valid, ((0, 0), (0, pad)))
h = enc.input_linear(xp)
norms = []
for i, layer in enumerate(enc.layers, start=1):
    h = layer(h, vp)
    if i == cfg.self_conditioning_layer:
        h = enc.self_condition(h)
    norms.append(np.linalg.norm(np.asarray(h[0, : x.shape[1]]), axis=-1))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
im = axes[0].imshow(np.asarray(hidden[0, : lengths[0], :128]).T, aspect="auto", origin="lower", cmap="magma")
axes[0].set(title="final hidden states (first 128 channels)", xlabel="frame", ylabel="channel")
fig.colorbar(im, ax=axes[0])
for i, n in enumerate(norms, start=1):
    axes[1].plot(n, lw=0.8, label=f"block {i}")
axes[1].set(title="per-frame activation norm by block", xlabel="frame", ylabel="L2 norm")
for boundary in range(cfg.context_size, len(norms[0]), cfg.context_size):
    axes[1].axvline(boundary, color="k", ls=":", lw=0.8)  # attention block boundaries
if len(norms) <= 4:
    axes[1].legend()
fig.tight_layout()
plt.show()
