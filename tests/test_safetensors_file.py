"""The pread-based safetensors reader against the safetensors library."""

from __future__ import annotations

import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from granite_jax.checkpoint.safetensors_file import SafetensorsError, SafetensorsFile, write_streamed


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


def test_written_files_map_their_aligned_tensors_copy_on_write(tmp_path):
    """`write_streamed` starts the data on a 64-byte boundary (the library reads the file); `get_mapped` maps a
    tensor whose bytes start on one (a write goes to a private page, not the file) and gives None elsewhere."""
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((4, 16)).astype(np.float32),
        "b": np.arange(3, dtype=np.float32),  # 4 x 16 x 4 bytes in: aligned
        "c": rng.standard_normal(5).astype(np.float32),  # 12 bytes after b: not
    }
    path = tmp_path / "w.safetensors"
    write_streamed(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}, tensors.__getitem__, {"x": "y"})
    ref = load_file(path)
    assert all(np.array_equal(ref[k], v) for k, v in tensors.items())
    f = SafetensorsFile(path)
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 64 == 0
    a = f.get_mapped("a")
    assert isinstance(a, np.memmap) and a.ctypes.data % 64 == 0 and np.array_equal(a, tensors["a"])
    assert f.get_mapped("b") is not None and f.get_mapped("c") is None
    a[0, 0] = 1e6
    del a
    assert np.array_equal(SafetensorsFile(path).get_tensor("a"), tensors["a"])
    with pytest.raises(KeyError, match="no tensor 'd'"):
        f.get_mapped("d")


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


def _raw(header: dict, data: bytes, *, pad_header: bytes = b"") -> bytes:
    text = json.dumps(header).encode() + pad_header
    return struct.pack("<Q", len(text)) + text + data


def _two(a, b, *, data_len=48, dtype="F32", shape_a=(3,), shape_b=(3,)):
    return {
        "a": {"dtype": dtype, "shape": list(shape_a), "data_offsets": list(a)},
        "b": {"dtype": dtype, "shape": list(shape_b), "data_offsets": list(b)},
    }, bytes(range(data_len))


# Malformed files: each is refused by the official library, and must be refused here too (never read as
# silently wrong weights).
MALFORMED = {
    "overlap": lambda: _raw(*_two((0, 12), (0, 12), data_len=12)),
    "overlap_partial": lambda: _raw(*_two((0, 12), (8, 20), data_len=20)),
    "negative_offset": lambda: _raw(*_two((-12, 0), (0, 12), data_len=12)),
    "gap": lambda: _raw(*_two((0, 12), (16, 28), data_len=28)),
    "not_from_zero": lambda: _raw(*_two((4, 16), (16, 28), data_len=28)),
    "past_the_end": lambda: _raw(*_two((0, 12), (12, 24), data_len=20)),
    "last_shifted_past_the_end": lambda: _raw(*_two((0, 12), (268, 280), data_len=24)),
    "buffer_left_over": lambda: _raw(*_two((0, 12), (12, 24), data_len=40)),
    "size_mismatch": lambda: _raw(*_two((0, 12), (12, 24), data_len=24, shape_b=(4,))),
    "end_before_begin": lambda: _raw(*_two((12, 0), (0, 12), data_len=12)),
    "unknown_dtype": lambda: _raw(*_two((0, 12), (12, 24), data_len=24, dtype="F33")),
    "shape_negative": lambda: _raw(*_two((0, 12), (12, 24), data_len=24, shape_b=(-3,))),
    "header_longer_than_file": lambda: struct.pack("<Q", 10_000) + b"{}",
    "header_not_object": lambda: _raw([], b""),
    "header_not_json": lambda: struct.pack("<Q", 5) + b"{nope",
    "metadata_not_strings": lambda: _raw({"__metadata__": {"a": 1}}, b""),
    "entry_not_object": lambda: _raw({"a": [1, 2]}, b""),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_files_are_refused_like_the_official_library(tmp_path, name):
    from safetensors import safe_open

    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(MALFORMED[name]())
    with pytest.raises(Exception), safe_open(path, framework="numpy") as f:  # noqa: B017 (its own error types)
        for k in f.keys():  # noqa: SIM118
            f.get_tensor(k)
    with pytest.raises(SafetensorsError, match=re.escape(str(path))):
        SafetensorsFile(path)


# The message names the fault that is there (not a consequence of it).
MESSAGES = {
    "overlap": "overlaps the tensor before it",
    "gap": "leaves a gap of 4 bytes",
    "not_from_zero": "leaves a gap of 4 bytes",
    "past_the_end": "runs past the end of the file [(]4 bytes short",
    "last_shifted_past_the_end": "runs past the end of the file [(]256 bytes short",
    "buffer_left_over": "cover 24 bytes of a 40-byte data buffer",
    "size_mismatch": "has 12 bytes for shape",
    "end_before_begin": "end before they begin",
}


@pytest.mark.parametrize("name", MESSAGES)
def test_malformed_files_name_their_fault(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(MALFORMED[name]())
    with pytest.raises(SafetensorsError, match=MESSAGES[name]):
        SafetensorsFile(path)


def test_padded_header_and_empty_file_are_valid(tmp_path):
    """What the official library accepts: a header padded with spaces; no tensors at all."""
    from safetensors import safe_open

    header, data = _two((0, 12), (12, 24), data_len=24)
    (tmp_path / "pad.safetensors").write_bytes(_raw(header, data, pad_header=b"    "))
    (tmp_path / "none.safetensors").write_bytes(_raw({}, b""))
    for name in ("pad", "none"):
        with safe_open(tmp_path / f"{name}.safetensors", framework="numpy") as f:
            want = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        got = SafetensorsFile(tmp_path / f"{name}.safetensors")
        assert sorted(got.keys()) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got.get_tensor(k), v)


def test_overlapping_checkpoint_is_refused_by_the_converter(tmp_path):
    """An HF checkpoint whose header makes one layer read another's bytes does not convert (it did, silently)."""
    pytest.importorskip("transformers")
    from granite_jax.convert.cli import main
    from granite_jax.testing import TINY
    from granite_jax.testing.hf import make_hf_checkpoint

    make_hf_checkpoint(TINY, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    a, b = "layers.0.ff1.up_proj.weight", "layers.1.ff1.up_proj.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]  # layer 1 would silently read layer 0's weights
    path.write_bytes(_raw(header, raw[8 + n :]))
    assert main([str(tmp_path / "hf"), str(tmp_path / "gj"), "--quiet"]) == 1
    assert not (tmp_path / "gj").exists()
