"""JAX's persistent compilation cache, switched on with sensible defaults for granite_jax."""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "granite_jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.0) -> str:
    """Keep compiled executables on disk, so a new process skips XLA compilation for shapes seen before.

    Each length bucket compiles once per machine and jax version instead of once per process. `path`
    defaults to `$GRANITE_JAX_CACHE_DIR` or `~/.cache/granite_jax/xla`. Call before the first `encode`;
    returns the directory used. The same as setting `jax_compilation_cache_dir` yourself (see JAX's
    "Persistent compilation cache" docs).
    """
    path = os.fspath(path or os.environ.get("GRANITE_JAX_CACHE_DIR") or DEFAULT_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
