"""The encoder's blocks are stacked (one ConformerBlock with a leading layer axis), while its flat parameter
dicts, the converter's and the checkpoint's currency, name every layer as the reference does."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from granite_jax.models.conformer import GraniteSpeechEncoder, abstract_params, encoder_from_params, params_of
from granite_jax.testing import TINY

CFG = dataclasses.replace(TINY, num_layers=3, cat_hidden_layers=(0, 2))
KERNEL = "ff1.up_proj.kernel"


@pytest.fixture(scope="module")
def model():
    return GraniteSpeechEncoder(CFG, rngs=nnx.Rngs(5))


def test_flat_names_are_per_layer(model):
    params = params_of(model)
    abstract = abstract_params(CFG)
    assert set(params) == set(abstract)
    assert not any(name.startswith("layers.") and not name.split(".")[1].isdigit() for name in params)
    stacked = model.layers.ff1.up_proj.kernel[...]
    assert stacked.shape[0] == CFG.num_layers
    for i in range(CFG.num_layers):
        assert abstract[f"layers.{i}.{KERNEL}"].shape == stacked.shape[1:]
        np.testing.assert_array_equal(params[f"layers.{i}.{KERNEL}"], stacked[i])
    assert not np.array_equal(params[f"layers.0.{KERNEL}"], params[f"layers.1.{KERNEL}"])  # distinct inits


def test_round_trip_and_layer_views(model):
    params = params_of(model)
    copy = dict(params)
    rebuilt = encoder_from_params(CFG, copy, consume=True)
    assert copy == {}, "consume leaves nothing behind"
    for name, value in params_of(rebuilt).items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    for i in (0, 2, -1):
        want = params[f"layers.{i % CFG.num_layers}.{KERNEL}"]
        np.testing.assert_array_equal(np.asarray(rebuilt.layer(i).ff1.up_proj.kernel[...]), want)
    x = jax.random.normal(jax.random.key(0), (2, 11, CFG.input_dim))
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))
    with pytest.raises(IndexError, match="layer 3 out of range for 3 layers"):
        model.layer(3)


def test_a_missing_or_misshapen_layer_is_named(model):
    params = params_of(model)
    params.pop(f"layers.1.{KERNEL}")
    with pytest.raises(ValueError, match=rf"missing \['layers\.1\.{KERNEL}'\]"):
        encoder_from_params(CFG, params)
    params = params_of(model)
    params[f"layers.3.{KERNEL}"] = params[f"layers.2.{KERNEL}"]
    with pytest.raises(ValueError, match=rf"unexpected \['layers\.3\.{KERNEL}'\]"):
        encoder_from_params(CFG, params)
    params = params_of(model)
    params[f"layers.2.{KERNEL}"] = params[f"layers.2.{KERNEL}"][:, :-1]
    with pytest.raises(ValueError, match=rf"layers\.2\.{KERNEL}: shape .* config expects"):
        encoder_from_params(CFG, params)


def test_weights_read_from_a_checkpoint_are_held_once(tmp_path, model):
    """A tensor read from a checkpoint file becomes the CPU device buffer in place (64-byte aligned, so XLA
    takes it as it is); arrays the caller still owns (a torch tensor's view, say) are copied."""
    from granite_jax.checkpoint import store
    from granite_jax.checkpoint.safetensors_file import aligned_empty

    for shape, dtype in [((3, 5), np.float32), ((7,), np.int8), ((0, 4), np.float32), ((), np.float64)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and (a.size == 0 or a.ctypes.data % 64 == 0)
    store.save(tmp_path / "ck", CFG, params_of(model), {"source": "test"})
    lazy = store.load(tmp_path / "ck").params
    assert lazy.fresh_arrays
    loaded = encoder_from_params(CFG, lazy)
    np.testing.assert_array_equal(np.asarray(loaded.input_linear.kernel[...]), model.input_linear.kernel[...])
    on_cpu = jax.default_backend() == "cpu"
    kernel = lazy["input_linear.kernel"]
    from granite_jax.checkpoint.params import _on_device

    held = _on_device(kernel, np.float32, fresh=True)
    assert (held.unsafe_buffer_pointer() == kernel.ctypes.data) == on_cpu  # in place on CPU
    copied = _on_device(kernel, np.float32, fresh=False)
    assert copied.unsafe_buffer_pointer() != kernel.ctypes.data
    kernel[...] = 7.0  # the owner changes its array: a copy does not see it
    assert not np.any(np.asarray(copied) == 7.0)
