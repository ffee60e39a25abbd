"""Metrics on trained dictionaries, separate from training.

- MMCS(D, G) = (1/|G|) sum_{g in G} max_{d in D} cos(d, g), computed in blocks so that memory
  stays O(block^2) whatever the dictionary sizes (65k x 65k never materialises).
- dead latents: latents that did not fire (c > 0) on any input of the last N steps.
- L0 = mean number of active latents per sample; FVU = sum||t - x^||^2 / sum||t - mean(t)||^2.
- SSLL = z(log reconstruction loss) + z(log L1 loss), z standardising over the grid.
- MMCS with larger dictionaries: a dictionary compared with the next larger ones at the same alpha.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import archs, sae

Array = jax.Array


def _pad_rows(a: Array, multiple: int) -> tuple[Array, int]:
    n = a.shape[0]
    pad = (-n) % multiple
    return jnp.pad(a, ((0, pad), (0, 0))), n


@functools.partial(jax.jit, static_argnames=("block",))
def max_cosine(learned_MxD: Array, reference_NxD: Array, block: int = 1024) -> Array:
    """For each reference row g: max over learned rows d of cos(d, g). Returns (N,).

    Both sets are normalised; the similarity matrix is built block x block at a time."""
    learned = sae.unit_rows(jnp.asarray(learned_MxD, jnp.float32))
    ref = sae.unit_rows(jnp.asarray(reference_NxD, jnp.float32))
    bl, br = min(block, learned.shape[0]), min(block, ref.shape[0])
    learned, m = _pad_rows(learned, bl)
    ref, n = _pad_rows(ref, br)
    learned_blocks = learned.reshape(-1, bl, learned.shape[1])
    valid_blocks = (jnp.arange(learned.shape[0]) < m).reshape(-1, bl)

    def ref_block(r_BxD):
        def body(best, lv):
            blk, ok = lv
            sim = jnp.where(ok[None, :], r_BxD @ blk.T, -jnp.inf)
            return jnp.maximum(best, jnp.max(sim, axis=1)), None
        best, _ = jax.lax.scan(body, jnp.full((r_BxD.shape[0],), -jnp.inf), (learned_blocks, valid_blocks))
        return best

    best = jax.lax.map(ref_block, ref.reshape(-1, br, ref.shape[1]))
    return best.reshape(-1)[:n]


def mmcs(learned_MxD: Array, reference_NxD: Array, block: int = 1024) -> float:
    """Mean max cosine similarity: mean over the reference of the best match in `learned`."""
    return float(jnp.mean(max_cosine(learned_MxD, reference_NxD, block=block)))


def dead_latents(since_fired: Array, window: int = 10) -> Array:
    """Number of latents that did not fire in the last `window` steps (counted per leading axes)."""
    return jnp.sum(jnp.asarray(since_fired) >= window, axis=-1)


def reconstruction_stats(params: sae.SAEParams, x_BxD: Array, target_BxD: Array | None = None,
                         convention: sae.L1Convention = "report",
                         arch: archs.Arch = archs.RELU_L1) -> dict[str, Array]:
    """recon_loss = mean (1/d)||t - x^||^2, l1_loss = mean L1(c), l0, fvu on one batch (c: the
    architecture's inference codes)."""
    t = x_BxD if target_BxD is None else target_BxD
    c = archs.encode(params, x_BxD, arch)
    err = t - sae.decode(params, c)
    return {
        "recon_loss": jnp.mean(jnp.square(err)),
        "l1_loss": sae.l1_penalty(c, convention),
        "l0": jnp.mean(jnp.sum(c > 0, axis=-1).astype(jnp.float32)),
        "fvu": jnp.sum(jnp.square(err)) / jnp.sum(jnp.square(t - jnp.mean(t, axis=0))),
    }


@functools.partial(jax.jit, static_argnames=("convention", "arch"))
def group_stats(params: sae.SAEParams, x_BxD: Array, target_BxD: Array,
                convention: sae.L1Convention = "report",
                arch: archs.Arch = archs.RELU_L1) -> dict[str, Array]:
    """reconstruction_stats for every cell of a stacked group: each value is (C,)."""
    return jax.vmap(reconstruction_stats, in_axes=(0, None, None, None, None))(
        params, x_BxD, target_BxD, convention, arch)


def standardized_log(values: np.ndarray) -> np.ndarray:
    """z(log v) over all finite, positive entries; NaN elsewhere (log undefined)."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v) & (v > 0)
    out = np.full(v.shape, np.nan)
    if ok.sum() >= 2:
        logs = np.log(v[ok])
        out[ok] = (logs - logs.mean()) / (logs.std() or 1.0)
    return out


def ssll(recon_loss: np.ndarray, l1_loss: np.ndarray) -> np.ndarray:
    """Summed standardised log losses: z(log recon) + z(log L1), NaN where a log is undefined."""
    return standardized_log(recon_loss) + standardized_log(l1_loss)


def mmcs_with_larger(dictionaries: Mapping[tuple[float, int, int], Array],
                     n_larger: int = 2) -> dict[tuple[float, int, int], float]:
    """For each (alpha, size, seed): mean MMCS against the next `n_larger` larger dictionaries at
    the same alpha and seed (the mean runs over the smaller one). NaN for the largest size."""
    out = {}
    for (a, m, s), dic in dictionaries.items():
        larger = sorted(m2 for (a2, m2, s2) in dictionaries if a2 == a and s2 == s and m2 > m)
        vals = [mmcs(dictionaries[(a, m2, s)], dic) for m2 in larger[:n_larger]]
        out[(a, m, s)] = float(np.mean(vals)) if vals else float("nan")
    return out


def fraction_recovered(learned_MxD: Array, reference_NxD: Array, threshold: float = 0.9) -> float:
    """Share of reference rows whose best learned match has cosine > threshold."""
    return float(jnp.mean(max_cosine(learned_MxD, reference_NxD) > threshold))


def plane(values: Sequence[float], l1: Sequence[float], ratio: Sequence[float],
          l1_axis: Sequence[float], ratio_axis: Sequence[float]) -> np.ndarray:
    """Arranges per-cell values on the (alpha, ratio) plane, averaging over seeds; NaN skipped."""
    grid = np.full((len(l1_axis), len(ratio_axis)), np.nan)
    a_idx = {a: i for i, a in enumerate(l1_axis)}
    r_idx = {r: j for j, r in enumerate(ratio_axis)}
    acc: dict[tuple[int, int], list[float]] = {}
    for v, a, r in zip(values, l1, ratio):
        acc.setdefault((a_idx[a], r_idx[r]), []).append(v)
    for (i, j), vs in acc.items():
        vs = [v for v in vs if v is not None and np.isfinite(v)]
        grid[i, j] = np.mean(vs) if vs else np.nan
    return grid
