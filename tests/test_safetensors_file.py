"""The pread-based safetensors reader against the safetensors library."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from granite_jax.safetensors_file import SafetensorsFile


def test_matches_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64_scalar": np.array(12345678901, np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    ref = load_file(tmp_path / "a.safetensors")
    assert sorted(f.keys()) == sorted(ref) and f.metadata == {"format": "pt"}
    for k, v in ref.items():
        got = f.get_tensor(k)
        assert got.dtype == v.dtype and got.shape == v.shape == f.shape(k), k
        np.testing.assert_array_equal(got, v)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="too short"):
        SafetensorsFile(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk")
    save_file({"x": np.ones(1000, np.float32)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(tmp_path / "t.safetensors").get_tensor("x")
