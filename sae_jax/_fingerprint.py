"""Order-independent 64-bit fingerprints of arrays, computed on device (checkpoint integrity)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector (typed keys as their key data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer) and x.dtype.itemsize < 4:
        x = x.astype(jnp.int32)  # exact for bool, 8/16-bit and 4-bit integers
    narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize)  # fp8, bf16, fp16
    if narrow is not None:
        x = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 64-bit: two words


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """``[Σ_i h_i, Σ_i h_i·(c_i | 1)] mod 2³²`` with ``h_i = fmix32(w_i ⊕ c_i)``, ``c_i = i·φ``.

    ``w_i`` is the i-th 32-bit word of the leaf. For a fixed position both terms are
    bijections of ``w_i``, so changing one word always changes both sums, and a change
    of several words goes unnoticed with probability about 2⁻⁶⁴ (``c_i`` makes moved
    words count). Sums of integers mod 2³² do not depend on the reduction order, so a
    leaf sharded over any number of devices has the same fingerprint.
    """
    w = _words(x)
    c = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)
    h = _fmix32(w ^ c)
    return jnp.stack([
        jnp.sum(h, dtype=jnp.uint32),
        jnp.sum(h * (c | jnp.uint32(1)), dtype=jnp.uint32),
    ])


@jax.jit
def _fingerprints_device(leaves: list[jax.Array]) -> jax.Array:
    """uint32[n_leaves, 2]: one fingerprint per leaf, in one compiled call."""
    return jnp.stack([_leaf_fingerprint(x) for x in leaves])


def fingerprints(leaves: list[Any]) -> list[str]:
    """Hex fingerprints of ``leaves``, computed where the arrays live.

    One compiled call per set of devices, since one call cannot mix arrays committed
    to different devices.
    """
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
    groups: dict[frozenset, list[int]] = {}
    for i, x in enumerate(arrays):
        groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    out = [""] * len(arrays)
    for idx in groups.values():
        fps = np.asarray(jax.device_get(_fingerprints_device([arrays[i] for i in idx])))
        for i, (a, b) in zip(idx, fps):
            out[i] = f"{int(a):08x}{int(b):08x}"
    return out
