"""SynthSAEBench worlds (Chanin & Garriga-Alonso 2026, arXiv:2602.14687) sampled in JAX.

A world is SAELens's `SyntheticModel` (`sae_lens.synthetic`) as arrays: F ground-truth
feature vectors d_f in R^D (unit rows), a bias b, firing probabilities p_f, an optional
low-rank Gaussian copula, a forest of features (hierarchy) and per-feature magnitude means
mu_f and stds sigma_f. `sample(key, world, n)` draws

    x = a @ W + b,    a in R^F the feature activations (N x F),

with the same distribution as SAELens's `ActivationGenerator.sample` followed by
`FeatureDictionary.forward`; pure and jittable (`n` static), so a grid can sample it inside
its compiled scan. Build a world with `load_saelens(dir)` (a model saved by
`SyntheticModel.save`) or `preset(name, seed=...)` (`sae_jax.synth_models`).

SAELens semantics reproduced, in its order:

1. firing: with the copula, z = eps @ L^T + eta * sqrt(c), eps ~ N(0, I_R), eta ~ N(0, I_F),
   L the correlation factor (F x R), c its diagonal term (so corr(z) = L L^T + diag(c) has a unit
   diagonal); feature f fires when z_f > Phi^-1(1 - p_f). Without it f fires with probability
   p_f. The saved p_f are SAELens's, after its hierarchy compensation and clamp to 1.
2. magnitude: a fired feature's value is relu(mu_f + sigma_f g), g ~ N(0, 1).
3. hierarchy, level by level over the forest's breadth-first levels (organisational nodes,
   without a feature, count as levels and pass their parent on): a child with effective parent
   q is multiplied by [a_q > 0], or by a_q / mu_q where a_q > 0 when its parent node has
   `scale_children_by_parent` (so the scale compounds down a tree); then, for each node at the
   level whose children are mutually exclusive, where the node's feature is active (a node
   without a feature: always), one of its active children (value > 0) chosen uniformly at
   random keeps its value and the others are set to 0 (their subtrees follow at the next level).
4. x = a @ W + b.

How the draws differ from SAELens's (the same distribution, fewer random numbers; the details
and the equations in `sae_jax.synth_slots`):

- eta is not drawn. Given eps, features fire independently, f with probability q_f =
  Phi(eps . l_f / sqrt(c_f) - t_f), t_f = Phi^-1(1 - p_f) / sqrt(c_f). A feature outside any
  mutually exclusive group draws one uniform u_f (32 random bits) per sample: it fires when
  u_f < q_f, and, given that, u_f / q_f ~ U(0, 1) is independent of the firing and of eps, so
  g = Phi^-1(u_f / q_f) is the magnitude's normal.
- a mutually exclusive group draws one 32-bit word per sample and nothing per child: its winner
  (the uniform choice among its active children) has a closed-form distribution given eps, and
  the word's position inside the winner's interval gives the winner's (truncated) normal.
- random words come two per Threefry-2x32 hash (`synth_slots.words`), not one.
- the output is dense (SAELens's `use_sparse_tensors` has no counterpart) and float32; normals
  are clipped to +-5.4 like `jax.random.normal`'s.

`feature_acts` gives a alone; `hierarchy_violations` counts broken constraints in samples.
Levels whose index arrays are ranges (SAELens numbers a generated forest breadth-first) gather
and update slices, not scattered columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae_jax import synth_slots

Array = jax.Array


Run = tuple[int, int] | None  # (start, repeat): an index array equal to start + arange(K) // repeat


@struct.dataclass
class Level:
    """One breadth-first level of the forest, as index arrays (K gated features, G groups of at
    most B mutually exclusive children, M = their count of valid children). The static runs say
    when an index array is a (repeated) range, so that a slice replaces the gather or scatter
    (SAELens numbers a generated forest breadth-first, so there every array is a run)."""

    feat_K: Array  # int32: features at this level that have an (effective) parent
    parent_K: Array  # int32: that parent
    rescale_K: Array  # bool: the parent node scales its children by a_q / mu_q
    sib_GxB: Array  # int32: mutually exclusive children of a node at this level (0-padded)
    valid_GxB: Array  # bool: a real child, not padding
    gparent_G: Array  # int32: the node's feature (0 where it has none)
    has_parent_G: Array  # bool: the node has a feature (else the group is always live)
    me_feat_M: Array  # int32: the valid children, flattened
    me_pos_M: Array  # int32: their positions in the flattened G x B group array
    feat_run: Run = struct.field(pytree_node=False, default=None)
    parent_run: Run = struct.field(pytree_node=False, default=None)
    sib_run: Run = struct.field(pytree_node=False, default=None)  # only when no padding
    gparent_run: Run = struct.field(pytree_node=False, default=None)


def _run(idx: np.ndarray) -> Run:
    """(start, repeat) when idx = start + arange(K) // repeat, else None."""
    idx = np.asarray(idx).reshape(-1)
    if idx.size == 0:
        return None
    rep = int(np.sum(idx == idx[0]))
    if idx.size % rep == 0 and np.array_equal(idx, idx[0] + np.arange(idx.size) // rep):
        return int(idx[0]), rep
    return None


def _take(a_NxF: Array, idx: Array, run: Run) -> Array:
    """a_NxF[:, idx], by a slice (repeated) when idx is a run."""
    if run is None:
        return a_NxF[:, idx]
    start, rep = run
    cols = a_NxF[:, start: start + idx.shape[0] // rep]
    return cols if rep == 1 else jnp.repeat(cols, rep, axis=1, total_repeat_length=idx.shape[0])


def _scale(a_NxF: Array, idx: Array, run: Run, factor: Array) -> Array:
    """a_NxF with columns idx multiplied by factor (N x K), by a slice when idx is a range."""
    if run is not None and run[1] == 1:
        start = run[0]
        cols = jax.lax.slice_in_dim(a_NxF, start, start + idx.shape[0], axis=1)
        return jax.lax.dynamic_update_slice_in_dim(a_NxF, cols * factor, start, axis=1)
    return a_NxF.at[:, idx].multiply(factor, unique_indices=True)


@struct.dataclass
class SynthWorld:
    """A SynthSAEBench world: dictionary W (F x D, unit rows), bias b, firing probabilities,
    optional low-rank copula (pre-divided by sqrt(c): l_f / sqrt(c_f) and t_f), magnitude means
    and stds, and the hierarchy's levels. Whether there is a copula and the forest's shape
    (levels, sizes, runs) are static, part of the compiled program; every number is a leaf."""

    features_FxD: Array
    bias_D: Array
    probs_F: Array  # p_f, SAELens's saved firing_probabilities
    corr_FxR: Array  # l_f / sqrt(c_f); (F, 0) without a copula
    thresh_F: Array  # Phi^-1(1 - p_f) / sqrt(c_f); unused without a copula
    mean_F: Array  # mu_f
    std_F: Array  # sigma_f
    levels: tuple[Level, ...]
    slots: synth_slots.Slots  # the sampler's layout of the same quantities (`synth_slots`)
    correlated: bool = struct.field(pytree_node=False, default=False)

    @property
    def d(self) -> int:
        return self.features_FxD.shape[1]

    @property
    def f(self) -> int:
        return self.features_FxD.shape[0]


# --------------------------------------------------------------------------------- hierarchy
def hierarchy_levels(roots: Sequence[dict[str, Any]], num_features: int) -> tuple[Level, ...]:
    """Encodes a forest of SAELens `HierarchyNode.to_dict` trees ({"feature_index",
    "mutually_exclusive_children", "scale_children_by_parent", "children"}) as `Level`s, walked
    breadth-first as SAELens's modifier walks it. Levels with nothing to do are dropped."""
    feats: list[tuple[int, int, int, bool]] = []  # (feature, effective parent, level, rescale)
    groups: list[tuple[int, int, list[int]]] = []  # (level, node feature or -1, children)
    queue = [(r, -1, 0, False) for r in roots]
    seen: set[int] = set()
    head = 0
    while head < len(queue):
        node, parent, level, rescale = queue[head]
        head += 1
        fi = node.get("feature_index")
        if fi is not None:
            fi = int(fi)
            if not 0 <= fi < num_features or fi in seen:
                raise ValueError(f"hierarchy: feature index {fi} out of range or repeated")
            seen.add(fi)
            feats.append((fi, parent, level, rescale))
            parent = fi
        children = node.get("children") or []
        if node.get("mutually_exclusive_children") and len(children) >= 2:
            kids = [int(c["feature_index"]) for c in children if c.get("feature_index") is not None]
            if len(kids) >= 2:
                groups.append((level, -1 if fi is None else fi, kids))
        for c in children:
            queue.append((c, parent, level + 1, bool(node.get("scale_children_by_parent"))))
    max_level = max([lv for _, _, lv, _ in feats] + [lv for lv, _, _ in groups], default=-1)
    out = []
    for level in range(max_level + 1):
        here = [(f, p, r) for f, p, lv, r in feats if lv == level and p >= 0]
        grp = [(q, kids) for lv, q, kids in groups if lv == level]
        if not here and not grp:
            continue
        b = max((len(k) for _, k in grp), default=0)
        sib = np.zeros((len(grp), b), np.int32)
        valid = np.zeros((len(grp), b), bool)
        for g, (_, kids) in enumerate(grp):
            sib[g, :len(kids)] = kids
            valid[g, :len(kids)] = True
        gpar = np.array([q for q, _ in grp], np.int32).reshape(-1)
        pos = np.flatnonzero(valid.reshape(-1)).astype(np.int32)
        feat = np.array([f for f, _, _ in here], np.int32).reshape(-1)
        par = np.array([p for _, p, _ in here], np.int32).reshape(-1)
        out.append(Level(
            jnp.asarray(feat), jnp.asarray(par),
            jnp.asarray(np.array([r for _, _, r in here], bool).reshape(-1)),
            jnp.asarray(sib), jnp.asarray(valid), jnp.asarray(np.maximum(gpar, 0)),
            jnp.asarray(gpar >= 0), jnp.asarray(sib.reshape(-1)[pos]), jnp.asarray(pos),
            _run(feat), _run(par), _run(sib) if valid.all() else None,
            _run(gpar) if np.all(gpar >= 0) else None))
    return tuple(out)


def make_world(features_FxD: np.ndarray, bias_D: np.ndarray, probs_F: np.ndarray,
               mean_F: np.ndarray, std_F: np.ndarray, corr_factor_FxR: np.ndarray | None = None,
               corr_diag_F: np.ndarray | None = None,
               roots: Sequence[dict[str, Any]] | None = None) -> SynthWorld:
    """A world from SAELens's quantities (host arrays): the copula's l_f and c_f are stored as
    l_f / sqrt(c_f) and t_f = Phi^-1(1 - p_f) / sqrt(c_f) (float64 on the host, then float32)."""
    from scipy.special import ndtri

    w = np.asarray(features_FxD, np.float32)
    f = w.shape[0]
    p = np.asarray(probs_F, np.float64)
    for name, a in (("bias_D", bias_D), ("probs_F", probs_F), ("mean_F", mean_F), ("std_F", std_F)):
        want = (w.shape[1],) if name == "bias_D" else (f,)
        if np.shape(a) != want:
            raise ValueError(f"{name} has shape {np.shape(a)}, expected {want}")
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError("firing probabilities must lie in [0, 1]")
    correlated = corr_factor_FxR is not None
    if correlated:
        lf = np.asarray(corr_factor_FxR, np.float64)
        c = np.asarray(corr_diag_F, np.float64)
        if lf.shape[0] != f or c.shape != (f,) or np.any(c <= 0):
            raise ValueError("correlation factor must be (F, R) and its diagonal (F,) positive")
        sc = np.sqrt(c)
        corr, thresh = lf / sc[:, None], ndtri(1.0 - p) / sc
    else:
        corr, thresh = np.zeros((f, 0)), np.zeros(f)
    levels = hierarchy_levels(roots or [], f)
    return SynthWorld(
        jnp.asarray(w), jnp.asarray(bias_D, jnp.float32), jnp.asarray(p, jnp.float32),
        jnp.asarray(corr, jnp.float32), jnp.asarray(thresh, jnp.float32),
        jnp.asarray(mean_F, jnp.float32), jnp.asarray(std_F, jnp.float32), levels,
        synth_slots.plan(levels, w, corr, thresh, p, mean_F, std_F), bool(correlated))


# ---------------------------------------------------------------------------------- sampling


def _apply_level(r_NxG: Array, world: SynthWorld, lv: Level, a_NxF: Array) -> Array:
    """Step 3 for one level: gate (or rescale) its children by their parents, then keep the
    floor(r k)-th of the k active children in each live mutually exclusive group."""
    n = a_NxF.shape[0]
    if lv.feat_K.shape[0]:
        par = _take(a_NxF, lv.parent_K, lv.parent_run)
        on = par > 0
        mean = _take(world.mean_F[None], lv.parent_K, lv.parent_run)
        scale = jnp.where(on, par / jnp.where(on, mean, 1.0), 0.0)
        factor = jnp.where(lv.rescale_K, scale, on.astype(a_NxF.dtype))
        a_NxF = _scale(a_NxF, lv.feat_K, lv.feat_run, factor)
    g, b = lv.sib_GxB.shape
    if g:
        live = _take(a_NxF, lv.gparent_G, lv.gparent_run) > 0
        live = jnp.where(lv.has_parent_G, live, True)
        sib = _take(a_NxF, lv.sib_GxB.reshape(-1), lv.sib_run).reshape(n, g, b)
        act = (sib > 0) & lv.valid_GxB & live[:, :, None]  # N x G x B
        count = act.sum(-1, dtype=jnp.int32)
        pick = jnp.minimum((r_NxG * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
        rank = jnp.cumsum(act, -1, dtype=jnp.int32) - 1
        keep = (~act | (rank == pick[:, :, None])).astype(a_NxF.dtype).reshape(n, g * b)
        if lv.sib_run is not None:
            a_NxF = _scale(a_NxF, lv.sib_GxB.reshape(-1), lv.sib_run, keep)
        else:
            a_NxF = _scale(a_NxF, lv.me_feat_M, None, keep[:, lv.me_pos_M])
    return a_NxF


def apply_hierarchy(world: SynthWorld, a_NxF: Array, r_levels: Sequence[Array]) -> Array:
    """Step 3 (SAELens's hierarchy modifier) on activations a_NxF; r_levels[i] (N x G_i, in
    [0, 1)) chooses the winners of level i's exclusive groups: the floor(r k)-th of the k active
    children (r uniform: a uniform choice; r = 0: the first active child)."""
    for r, lv in zip(r_levels, world.levels, strict=True):
        a_NxF = _apply_level(r, world, lv, a_NxF)
    return a_NxF


def feature_acts(key: Array, world: SynthWorld, n: int) -> Array:
    """n samples of the feature activations a (N x F), SAELens's `ActivationGenerator.sample`."""
    return synth_slots.values(key, world.slots, world.correlated, n)[:, world.slots.slot_F]


def sample(key: Array, world: SynthWorld, n: int) -> tuple[Array, Array]:
    """Draws n samples: (x_NxD, feature_acts_NxF) with x = a @ W + b (module docstring), computed
    in the sampler's slot order (x = V W_slots + b, `synth_slots`)."""
    out = synth_slots.blocks(key, world.slots, world.correlated, n)
    return synth_slots.inputs(out, world.slots, world.bias_D), synth_slots.joined(out)[:, world.slots.slot_F]


def hierarchy_violations(world: SynthWorld, a_NxF: Array) -> tuple[Array, Array]:
    """(active children whose parent is inactive, live exclusive groups with more than one
    active child), counted over the samples a_NxF; both 0 for `sample`'s output."""
    on = a_NxF > 0
    orphans = exclusive = jnp.zeros((), jnp.int32)
    for lv in world.levels:
        if lv.feat_K.shape[0]:
            orphans += jnp.sum(on[:, lv.feat_K] & ~on[:, lv.parent_K], dtype=jnp.int32)
        if lv.sib_GxB.shape[0]:
            live = jnp.where(lv.has_parent_G, on[:, lv.gparent_G], True)
            n_on = jnp.sum(on[:, lv.sib_GxB] & lv.valid_GxB, axis=-1)
            exclusive += jnp.sum(live & (n_on > 1), dtype=jnp.int32)
    return orphans, exclusive


__all__ = ["Level", "SynthWorld", "apply_hierarchy", "feature_acts", "hierarchy_levels",
           "hierarchy_violations", "make_world", "sample"]
