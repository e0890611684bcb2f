"""`lengths`: a padded batch equals each row encoded alone; buckets bound recompilation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import granite_jax
from granite_jax.runtime.buckets import BucketPolicy
from granite_jax.runtime.buckets import ladder_frames as _ladder_frames
from granite_jax.testing import TINY, convert_cli, rel_err, torch_encode
from granite_jax.testing.hf import make_hf_checkpoint

CFG = dataclasses.replace(TINY, num_layers=3, conv_kernel_size=6, cat_hidden_layers=(0, 1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("lengths")
    ref = make_hf_checkpoint(CFG, d / "hf", seed=21)
    convert_cli(d / "hf", d / "gj")
    return ref, granite_jax.load(d / "gj")


@pytest.mark.torch
@pytest.mark.parametrize(
    "lengths",
    [[17, 3], [8, 16, 24, 1], [23, 22, 9, 15, 2], [5, 5], [1, 40, 39, 33, 32, 31, 8]],
    ids=lambda ls: "-".join(map(str, ls)),
)
def test_batched_with_lengths_equals_one_by_one(pair, lengths):
    ref, model = pair
    rng = np.random.default_rng(len(lengths))
    t = max(lengths)
    x = rng.standard_normal((len(lengths), t, CFG.input_dim)).astype(np.float32)
    # garbage in the padding must not matter
    for i, n in enumerate(lengths):
        x[i, n:] = 100.0 * rng.standard_normal((t - n, CFG.input_dim))
    got = np.asarray(model.encode_features(x, lengths=lengths))
    for i, n in enumerate(lengths):
        alone = torch_encode(ref, x[i : i + 1, :n])[0]
        assert rel_err(got[i, :n], alone) < 1e-4, f"row {i} (length {n})"
        assert not got[i, n:].any(), f"row {i}: frames past the length are not zero"
        solo = np.asarray(model.encode_features(x[i : i + 1, :n]))[0]
        np.testing.assert_allclose(got[i, :n], solo, rtol=0, atol=1e-5 * np.abs(solo).max())


def test_full_lengths_equal_no_lengths(pair):
    _, model = pair
    x = np.random.default_rng(0).standard_normal((3, 21, CFG.input_dim)).astype(np.float32)
    a = np.asarray(model.encode_features(x))
    b = np.asarray(model.encode_features(x, lengths=[21, 21, 21]))
    np.testing.assert_array_equal(a, b)


def test_same_bucket_does_not_recompile(pair):
    _, model = pair
    rng = np.random.default_rng(1)
    model.encode_features(rng.standard_normal((2, 200, CFG.input_dim)).astype(np.float32))
    n = model.num_compilations
    same_bucket = [t for t in range(1, 300) if model.bucket_frames(t) == model.bucket_frames(200)]
    assert len(same_bucket) > 10
    for t in same_bucket:
        model.encode_features(rng.standard_normal((2, t, CFG.input_dim)).astype(np.float32))
    model.encode_features(rng.standard_normal((2, 200, CFG.input_dim)).astype(np.float32), lengths=[3, 200])
    assert model.num_compilations == n


def test_stream_of_lengths_compiles_once_per_bucket(pair):
    _, model = pair
    rng = np.random.default_rng(2)
    before = model.num_compilations
    lengths = rng.integers(1, 400, size=60)
    buckets = {model.bucket_frames(int(t)) for t in lengths}
    for t in lengths:
        model.encode_features(np.zeros((1, int(t), CFG.input_dim), np.float32))
    assert model.num_compilations - before <= len(buckets)
    assert len(buckets) <= 8 * np.log2(400 / 8) + 1


def test_ladder_buckets():
    assert [_ladder_frames(n) for n in (1, 8, 9, 15, 16, 17, 18, 19, 31, 33)] == [8, 8, 9, 15, 16, 18, 18, 20, 32, 36]
    assert [_ladder_frames(n) for n in (500, 1500, 6000)] == [512, 1536, 6144]
    for n in range(1, 20000):
        b = _ladder_frames(n)
        assert n <= b <= max(8, 1.125 * n)
    assert len({_ladder_frames(n) for n in range(50, 6001)}) <= 8 * np.log2(6000 / 50) + 1


def test_bucket_policies():
    assert BucketPolicy.make("block").frames_for(401, 200) == 600
    assert BucketPolicy.make("auto").frames_for(1001, 200) == 1024
    # past one tile, rows are cut into whole blocks, so the bucket is whole blocks too
    assert BucketPolicy.make("auto").frames_for(6000, 200, tile_frames=1600) == 6000
    assert BucketPolicy.make("auto").frames_for(6201, 200, tile_frames=1600) == 6400
    assert BucketPolicy.make("auto").frames_for(1500, 200, tile_frames=1600) == 1536
    explicit = BucketPolicy.make([1000, 400])
    assert explicit.frames_for(1, 200) == 400
    assert explicit.frames_for(401, 200) == 1000
    assert explicit.frames_for(1001, 200) == 1024  # past the largest: "auto"
    with pytest.raises(ValueError, match="positive frame counts"):
        BucketPolicy.make([0])
    with pytest.raises(ValueError, match="buckets must be"):
        BucketPolicy.make("fast")


def test_bucket_choice_does_not_change_results(pair, tmp_path):
    _, model = pair
    x = np.random.default_rng(3).standard_normal((2, 19, CFG.input_dim)).astype(np.float32)
    other = granite_jax.Runner(model.model, buckets=[64])
    np.testing.assert_allclose(
        np.asarray(model.encode_features(x, lengths=[19, 4])),
        np.asarray(other.encode_features(x, lengths=[19, 4])),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "features, lengths, match",
    [
        (np.zeros((2, 5, 12), np.float32), [5], "lengths must be 2 integers"),
        (np.zeros((2, 5, 12), np.float32), [5, 6], r"lengths must lie in \[1, 5\]"),
        (np.zeros((2, 5, 12), np.float32), [0, 5], r"lengths must lie in \[1, 5\]"),
        (np.zeros((2, 5, 12), np.float32), [2.0, 5.0], "integers"),
        (np.zeros((2, 5, 11), np.float32), None, "input_dim=12"),
        (np.zeros((2, 0, 12), np.float32), None, "at least one frame"),
        (np.zeros((1, 2, 5, 12), np.float32), None, r"must be \(batch, frames, 12\)"),
        (np.zeros((2, 5, 12), np.int32), None, "floating-point"),
    ],
)
def test_bad_input_is_named(pair, features, lengths, match):
    _, model = pair
    with pytest.raises(ValueError, match=match):
        model.encode_features(features, lengths=lengths)


def test_updates_to_the_module_are_seen_without_recompiling(pair):
    """`encode_features` reads the module's current variables (fine-tuning, surgery) on every call."""
    _, model = pair
    x = np.random.default_rng(4).standard_normal((1, 16, CFG.input_dim)).astype(np.float32)
    before = np.asarray(model.encode_features(x))
    n = model.num_compilations
    bias = model.model.out_mid.bias
    old = bias[...]
    try:
        bias.set_value(old + 1.0)
        after = np.asarray(model.encode_features(x))
    finally:
        bias.set_value(old)
    assert np.abs(after - before).max() > 1e-2
    assert model.num_compilations == n
    np.testing.assert_array_equal(np.asarray(model.encode_features(x)), before)
