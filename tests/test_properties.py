"""Property tests (hypothesis): whatever shapes, lengths, dtypes and magnitudes are passed, `encode_features`
and `encode` either raise a named ValueError / TypeError or return finite results whose rows equal each
utterance encoded alone."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.runtime.runner import Runner
from granite_jax.testing import TINY

CFG = dataclasses.replace(TINY, input_dim=160, num_layers=2)
# A fixed seed: CI explores the same examples every run (pseudo-random ones, not hypothesis' simplest first).
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# Repeats weight the draws towards inputs that should work.
DTYPES = [np.float32] * 4 + [np.float64, np.float16, ml_dtypes.bfloat16, np.int16, np.bool_]
MAGNITUDES = [1e-6, 1.0, 1.0, 1.0, 30.0, 1e4, 1e12, 1e20, 1e30]


@pytest.fixture(scope="module")
def runner():
    return Runner(GraniteSpeechEncoder(CFG, rngs=nnx.Rngs(3)), chunk_blocks=2)


def _named(e: Exception) -> None:
    """A user error must say something specific."""
    assert isinstance(e, (ValueError, TypeError)), repr(e)
    assert len(str(e)) > 20, repr(e)


@st.composite
def feature_batches(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 3 * CFG.context_size + 1))
    lengths = np.array(draw(st.lists(st.integers(1, t), min_size=b, max_size=b)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((b, t, CFG.input_dim)) * draw(st.sampled_from(MAGNITUDES))
    poison = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf]))
    in_padding = draw(st.booleans())
    if poison is not None:
        row = draw(st.integers(0, b - 1))
        if in_padding and lengths[row] < t:
            x[row, draw(st.integers(int(lengths[row]), t - 1)), 0] = poison
        else:
            x[row, draw(st.integers(0, int(lengths[row]) - 1)), 0] = poison
    with np.errstate(all="ignore"):
        return x.astype(dtype), lengths


@seed(20261201)
@SETTINGS
@given(batch=feature_batches())
def test_encode_features_raises_or_is_finite_and_per_utterance(runner, batch):
    x, lengths = batch
    try:
        out = np.asarray(runner.encode_features(x, lengths))
    except (ValueError, TypeError) as e:
        _named(e)
        return
    valid = np.arange(x.shape[1])[None] < lengths[:, None]
    assert np.isfinite(out[valid]).all()
    assert not out[~valid].any()
    for i, n in enumerate(lengths):
        alone = np.asarray(runner.encode_features(x[i : i + 1, :n]))
        scale = max(np.abs(alone).max(), 1e-30)
        assert np.abs(out[i, :n] - alone[0]).max() / scale < 1e-4


@st.composite
def waveform_lists(draw):
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-6, 0.5, 0.5, 0.5, 1.0, 30.0, 1e12, 1e20]))
    layout = draw(st.sampled_from(["1d", "1d", "1d", "1xN", "Nx1", "2xN"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    waves = []
    for _ in range(n):
        w = rng.standard_normal(draw(st.integers(200, 2500))) * scale
        if draw(st.integers(0, 19)) == 0:
            w[draw(st.integers(0, len(w) - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        with np.errstate(all="ignore"):
            w = w.astype(dtype)
        waves.append({"1d": w, "1xN": w[None], "Nx1": w[:, None], "2xN": np.stack([w, w])}[layout])
    return waves


@seed(20261202)
@SETTINGS
@given(waves=waveform_lists())
def test_encode_raises_or_is_finite_and_per_utterance(runner, waves):
    try:
        res = runner.encode(waves)
    except (ValueError, TypeError) as e:
        _named(e)
        return
    hidden = np.asarray(res.hidden_states)
    assume(len(waves) > 0)
    for i, n in enumerate(res.lengths):
        assert np.isfinite(hidden[i, :n]).all()
        assert not hidden[i, n:].any()
        alone = np.asarray(runner.encode([waves[i]]).hidden_states)[0]
        scale = max(np.abs(alone).max(), 1e-30)
        assert np.abs(hidden[i, :n] - alone).max() / scale < 1e-4
