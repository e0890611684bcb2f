"""A lazy safetensors reader that uses plain reads instead of mmap, and validates like the official library.

`safetensors.safe_open` maps the whole file, so every tensor read stays resident (as file-backed RSS) until
the handle is dropped, and loading a model briefly counts its weights twice. Reading each tensor with
`pread` into its own array keeps peak memory at the weights plus one tensor. `get_mapped` maps one tensor
alone, for a table of which a run uses a few rows (the language model's token embeddings).

The header is checked as strictly as the official library checks it, so that a malformed file is refused
rather than read as silently wrong weights: a JSON object of entries with a known dtype, a shape of
non-negative integers and `data_offsets` [begin, end]; sorted by offset the entries must tile the data
buffer exactly (the first at 0, each beginning where the previous ended, the last ending at the end of the
file: no overlap, no gap, nothing out of bounds), and each must hold dtype size x elements bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_NUMPY = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Bytes per element of every dtype the format defines (readable or not here).
_SIZES = {"U64": 8, "U32": 4, "U16": 2, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "C64": 8}
_SIZES.update({k: v.itemsize for k, v in _NUMPY.items()})
MAX_HEADER = 100_000_000  # the official library's limit


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message names it and what is wrong."""


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """Header parsed and validated once; `get_tensor(name)` reads that tensor's bytes only."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise SafetensorsError(f"{self.path} is not a safetensors file (too short: {size} bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(
                        f"{self.path} is not a safetensors file (a header of {n} bytes in a file of {size})"
                    )
                text = f.read(n)
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e.strerror or e}") from None
        if not text.startswith(b"{"):
            raise SafetensorsError(f"{self.path} is not a safetensors file (the header is not a JSON object)")
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{self.path} is not a safetensors file (header: {e})") from None
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise SafetensorsError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata = metadata or {}
        self._entries = header
        self._data_start = 8 + n
        self._validate(size - 8 - n)

    def _validate(self, buffer: int) -> None:
        spans = []
        for name, entry in self._entries.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
                raise SafetensorsError(f"{where} must have exactly dtype, shape and data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _SIZES:
                raise SafetensorsError(f"{where} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
                raise SafetensorsError(f"{where} has an invalid shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
                raise SafetensorsError(f"{where} has invalid data_offsets {offsets!r}")
            begin, end = offsets
            if end < begin:
                raise SafetensorsError(f"{where} has data_offsets {offsets} that end before they begin")
            want = _SIZES[dtype] * math.prod(shape)
            if end - begin != want:
                raise SafetensorsError(f"{where} has {end - begin} bytes for shape {tuple(shape)} {dtype} ({want})")
            spans.append((begin, end, name))
        at = 0
        for begin, end, name in sorted(spans):
            if end > buffer:  # the official library's "metadata incomplete buffer"
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} at bytes {begin}-{end} runs past the end of the file "
                    f"({end - buffer} bytes short of its {buffer}-byte data buffer: truncated?)"
                )
            if begin != at:
                what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes"
                raise SafetensorsError(f"{self.path}: tensor {name!r} at bytes {begin}-{end} {what}")
            at = end
        if at != buffer:
            raise SafetensorsError(
                f"{self.path}: the tensors cover {at} bytes of a {buffer}-byte data buffer (truncated or padded)"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get_tensor(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        entry = self._entries[name]
        dtype = _NUMPY.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which cannot be read here")
        begin, _ = entry["data_offsets"]
        out = aligned_empty(tuple(entry["shape"]), dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            read = 0
            while read < len(buf):
                got = os.preadv(f.fileno(), [buf[read:]], self._data_start + begin + read)
                if got <= 0:
                    raise SafetensorsError(f"{self.path} is truncated (tensor {name})")
                read += got
        return out

    def get_mapped(self, name: str) -> np.ndarray | None:
        """The tensor as a copy-on-write map of its bytes in the file (`np.memmap`, mode "c"), or None where its
        data does not start on a 64-byte boundary (XLA CPU would copy it). A device buffer made from it aliases
        the mapping: pages never touched (an embedding table's unused rows) are never read, and a write goes
        to a private copy of its page, never to the file."""
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        entry = self._entries[name]
        dtype = _NUMPY.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        if dtype is None or end == begin or (self._data_start + begin) % ALIGNMENT:
            return None
        try:
            return np.memmap(self.path, dtype, mode="c", offset=self._data_start + begin, shape=tuple(entry["shape"]))
        except OSError:  # a file system that cannot map files: read it instead
            return None


ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary: XLA's CPU client takes such a buffer
    as it is (`jax.device_put` makes no copy), so a tensor read from a file is held once, not twice."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate entries {dupes}")
    return dict(pairs)


_CODES = {v: k for k, v in _NUMPY.items()}


def write_streamed(
    path: str | os.PathLike,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    read,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time: the header from `specs` ({name: (shape, dtype)}), then
    each `read(name)` in turn, so that only one tensor is held at once (the official writer takes them all).

    Names are written in sorted order, as the official library writes them; a tensor whose shape or dtype is
    not its spec's is refused (the caller's file is then incomplete: write into an atomic folder).
    """
    names = sorted(specs)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    at = 0
    for name in names:
        shape, dtype = specs[name]
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise SafetensorsError(f"{name}: dtype {dtype} cannot be written")
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # the data buffer starts 64-byte aligned (see `get_mapped`)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            shape, dtype = specs[name]
            value = np.asarray(read(name))
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise SafetensorsError(
                    f"{name}: got {value.dtype}{list(value.shape)}, the header says {np.dtype(dtype)}{list(shape)}"
                )
            f.write(np.require(value, requirements="C").tobytes())
            del value
