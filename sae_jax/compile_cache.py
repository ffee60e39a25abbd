"""JAX's persistent compilation cache for the `sae-jax` command.

A repeated command loads its compiled programs from disk instead of compiling them again.
The cache lives in `$SAE_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/sae_jax/jax`, else
`~/.cache/sae_jax/jax`; `SAE_JAX_COMPILE_CACHE=0` turns it off. Only the CLI turns it on: a
library import changes no global JAX setting.
"""

from __future__ import annotations

import os

import jax

ENV_OFF = "SAE_JAX_COMPILE_CACHE"
ENV_DIR = "SAE_JAX_CACHE_DIR"


def cache_dir() -> str:
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sae_jax", "jax")


def enable() -> str | None:
    """Points JAX's persistent cache at `cache_dir()` (every program, however quick to compile);
    returns the directory, or None when turned off or not writable."""
    if os.environ.get(ENV_OFF, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
