"""Pytree helpers of `sae_jax.checkpoint`: what a state's leaves are, the restore target, and
placing leaves restored without a target back into a state's structure by key path."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def leaf_records(state: PyTree) -> list[dict[str, Any]]:
    """Path, shape and JAX dtype of every leaf of ``state`` (concrete or abstract)."""
    records = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            dtype = leaf.dtype
        else:  # NumPy or Python: the dtype it gets as a JAX array (int64 -> int32)
            dtype = jax.dtypes.canonicalize_dtype(np.result_type(leaf))
        path, shape = jax.tree_util.keystr(path), list(np.shape(leaf))
        records.append({"path": path, "shape": shape, "dtype": str(dtype)})
    return records


def concrete_target(abstract_state: PyTree) -> PyTree:
    """The restore target: shape, dtype and sharding of every array leaf.

    Leaves without a sharding go to this process's first device, so a checkpoint written
    on another device (or process) count still restores.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or default)
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else x,
        abstract_state,
    )


def by_path(raw: Any, abstract_state: PyTree) -> PyTree:
    """abstract_state's structure filled with the leaves of `raw` (nested dicts and lists, as
    Orbax restores without a target) found by their key paths, each put on its sharding."""
    def get(path: tuple, leaf: Any) -> Any:
        node = raw
        for key in path:
            name = next(getattr(key, a) for a in ("name", "key", "idx") if hasattr(key, a))
            node = node[str(name)] if isinstance(node, dict) and name not in node else node[name]
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.device_put(np.asarray(node, dtype=leaf.dtype), leaf.sharding)
        return node
    return jax.tree_util.tree_map_with_path(get, concrete_target(abstract_state))


def first_difference(saved: list[dict], wanted: list[dict]) -> str:
    """One line naming the first leaf that differs between checkpoint and target."""
    for s, w in zip(saved, wanted):
        if s != w:
            show = lambda r: f"{r['path']} {r['dtype']}{r['shape']}"  # noqa: E731
            return f"the checkpoint has {show(s)} where the state has {show(w)}"
    return f"the checkpoint has {len(saved)} arrays, the state has {len(wanted)}"
