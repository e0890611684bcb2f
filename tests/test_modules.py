"""Per-submodule parity (feed-forward, attention, conv module, block, self-conditioning) at tight tolerance.

The NNX tree mirrors torch's (the blocks stacked), so `model.layer(0).attn` is compared with
`ref.layers[0].attn` directly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import granite_jax
from granite_jax.testing import TINY, convert_cli, jit_call, rel_err
from granite_jax.testing.hf import make_hf_checkpoint

pytestmark = pytest.mark.torch
TOL = 1e-5

CFG = dataclasses.replace(TINY, num_layers=2, conv_kernel_size=4, num_heads=3, dim_head=8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("modules")
    ref = make_hf_checkpoint(CFG, d / "hf", seed=11)
    convert_cli(d / "hf", d / "gj")
    return ref, granite_jax.load(d / "gj").model


def _padded(x: np.ndarray, c: int):
    """x padded to a multiple of c, with its (B, T') valid mask."""
    b, t, _ = x.shape
    pad = -t % c
    valid = np.arange(t + pad)[None].repeat(b, 0) < t
    return jnp.asarray(np.pad(x, ((0, 0), (0, pad), (0, 0)))), jnp.asarray(valid)


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


@pytest.mark.parametrize("t", [1, 7, 8, 9, 24])
def test_feed_forward(pair, t):
    ref, model = pair
    x = np.random.default_rng(t).standard_normal((2, t, CFG.hidden_dim)).astype(np.float32)
    for name in ("ff1", "ff2"):
        with torch.no_grad():
            want = getattr(ref.layers[1], name)(_t(x)).numpy()
        got = jit_call(getattr(model.layer(1), name))(jnp.asarray(x))
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("t", [1, 7, 8, 9, 24])
def test_attention(pair, t):
    ref, model = pair
    x = np.random.default_rng(t).standard_normal((2, t, CFG.hidden_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.layers[0].attn(_t(x), attention_dists=ref.attention_dists).numpy()
    xp, valid = _padded(x, CFG.context_size)
    got = np.asarray(jit_call(model.layer(0).attn)(xp, valid))[:, :t]
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("t", [1, 3, 8, 13])
def test_conv_module(pair, t):
    ref, model = pair
    x = np.random.default_rng(t).standard_normal((2, t, CFG.hidden_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.layers[0].conv(_t(x)).numpy()
    got = jit_call(model.layer(0).conv)(jnp.asarray(x), jnp.ones((2, t), bool))
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("t", [5, 8, 17])
def test_block(pair, t):
    ref, model = pair
    x = np.random.default_rng(t).standard_normal((2, t, CFG.hidden_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.layers[1](_t(x), attention_dists=ref.attention_dists).numpy()
    xp, valid = _padded(x, CFG.context_size)
    got = np.asarray(jit_call(model.layer(1))(xp, valid))[:, :t]
    assert rel_err(got, want) < TOL


def test_self_conditioning(pair):
    ref, model = pair
    x = np.random.default_rng(0).standard_normal((2, 6, CFG.hidden_dim)).astype(np.float32)
    with torch.no_grad():
        h = _t(x)
        want = (h + ref.out_mid(torch.softmax(ref.out(h), dim=-1))).numpy()
        want_logits = ref.out(h).numpy()
    got, logits = model.self_condition(jnp.asarray(x))
    assert rel_err(got, want) < TOL and rel_err(logits, want_logits) < TOL


def test_padded_frames_do_not_leak_into_the_conv(pair):
    """Garbage past a row's length must not change the conv output at valid frames."""
    _, model = pair
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 12, CFG.hidden_dim)).astype(np.float32)
    valid = jnp.asarray(np.arange(12)[None] < 9)
    noisy = x.copy()
    noisy[:, 9:] = 1e3 * rng.standard_normal((1, 3, CFG.hidden_dim))
    a = np.asarray(model.layer(0).conv(jnp.asarray(x), valid))[:, :9]
    b = np.asarray(model.layer(0).conv(jnp.asarray(noisy), valid))[:, :9]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
