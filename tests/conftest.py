"""Test settings: full fp32 precision everywhere, GPU memory shared by workers, markers that skip.

Markers (pyproject.toml): `torch` (needs the torch reference), `torchaudio` (HF's feature extractor),
`gpu`, `slow`. Shared helpers live in `granite_jax.testing`, a normal module.
"""

from __future__ import annotations

import os

# On a GPU, pytest-xdist workers (and the subprocesses some tests start) share the device: do not let
# each one preallocate most of its memory. Must be set before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The tests' models are tiny, so their time goes to XLA compiles. Three CPU codegen settings cut a compile by
# more than half: LLVM at -O0, the classic fusion emitters (the HLO passes and the library matmuls are the same),
# and each program's LLVM module compiled in one piece (splitting it for parallel codegen only adds work when the
# two xdist workers already use both cores).
# Subprocesses and notebook kernels inherit them. The CLI demo test runs with XLA's defaults, the settings users
# get (tests/test_cli.py). GRANITE_JAX_TEST_XLA_DEFAULTS=1 keeps the defaults everywhere.
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
if os.environ.get("GRANITE_JAX_TEST_XLA_DEFAULTS") != "1" and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from granite_jax.testing import HAS_TORCH, HAS_TORCHAUDIO  # noqa: E402

# fp32 matmuls default to TF32 on GPUs; the parity tolerances assume full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole run, shared by the xdist workers: the many Runners the tests
# build over the same configs and shapes compile each program once (a cache hit is the same executable).
# GRANITE_JAX_TEST_CACHE=0 turns it off.
if os.environ.get("GRANITE_JAX_TEST_CACHE", "1") != "0":
    import tempfile

    # made by the first process (pytest's, before it starts the xdist workers, which inherit the variable)
    _OWN_CACHE = "GRANITE_JAX_TEST_CACHE_DIR" not in os.environ
    if _OWN_CACHE:
        os.environ["GRANITE_JAX_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="granite-jax-pytest-xla-")
    _cache = os.environ["GRANITE_JAX_TEST_CACHE_DIR"]
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # the same for the subprocesses some tests start (CLIs, simulated devices, killed runs, notebook kernels)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_SKIPS = {
    "torch": (not HAS_TORCH, "needs the torch reference: pip install 'granite-jax[torch]'"),
    "torchaudio": (not HAS_TORCHAUDIO, "needs torchaudio (HF's feature extractor)"),
    "gpu": (jax.default_backend() not in ("gpu", "cuda", "rocm"), "needs a GPU"),
}


def pytest_sessionfinish(session, exitstatus):
    """The process that made the run's compilation cache removes it (the xdist workers have their own session)."""
    if globals().get("_OWN_CACHE") and not hasattr(session.config, "workerinput"):
        import shutil

        shutil.rmtree(os.environ["GRANITE_JAX_TEST_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, (skip, why) in _SKIPS.items():
            if skip and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
