"""Test settings: full fp32 precision everywhere, GPU memory shared by workers, markers that skip.

Markers (pyproject.toml): `torch` (needs the torch reference), `torchaudio` (HF's feature extractor),
`gpu`, `slow`. Shared helpers live in `granite_jax.testing`, a normal module.
"""

from __future__ import annotations

import os

# On a GPU, pytest-xdist workers (and the subprocesses some tests start) share the device: do not let
# each one preallocate most of its memory. Must be set before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from granite_jax.testing import HAS_TORCH, HAS_TORCHAUDIO  # noqa: E402

# fp32 matmuls default to TF32 on GPUs; the parity tolerances assume full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")

_SKIPS = {
    "torch": (not HAS_TORCH, "needs the torch reference: pip install 'granite-jax[torch]'"),
    "torchaudio": (not HAS_TORCHAUDIO, "needs torchaudio (HF's feature extractor)"),
    "gpu": (jax.default_backend() not in ("gpu", "cuda", "rocm"), "needs a GPU"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, (skip, why) in _SKIPS.items():
            if skip and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
