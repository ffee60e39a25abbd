"""The SynthSAEBench sampler's draws (`synth_world.sample`), laid out in slots.

Given the copula's low-rank normal eps (R numbers per sample), features fire independently:
f fires with probability q_f = Phi(eps . l_f / sqrt(c_f) - t_f) (q_f = p_f without a copula), and
a fired feature's value is relu(mu_f + sigma_f g), g ~ N(0, 1). So a fired feature is *active*
(value > 0) with probability q'_f = q_f r_f, r_f = Phi(mu_f / sigma_f), and its value given that
is mu_f + sigma_f g with g ~ N(0, 1) truncated to g > -mu_f / sigma_f.

A mutually exclusive group of children keeps one of its active children, chosen uniformly; the
rest of the hierarchy only gates or scales that child by the group's (common) effective parent.
So a group needs only its winner: child c wins with probability

    w_c = q'_c E[1 / (1 + K_c)] = q'_c int_0^1 prod_{j != c} (1 - q'_j (1 - t)) dt,

K_c the number of the other active children (E[s^K] is the product; int_0^1 s^k ds = 1 / (1 + k)),
exactly by Gauss-Legendre quadrature on ceil(B / 2) nodes (the integrand has degree B - 1 in t).
One uniform 32-bit word U per group and sample picks the winner: with T_c = floor(2^32 sum_{c' <=
c} w_c'), c wins when T_{c-1} <= U < T_c (no winner above T_B), and, given that, v = (U - T_{c-1}
+ 1/2) / (T_c - T_{c-1}) is uniform and independent of the choice: the winner's normal is
g = Phi^-1(1 - r_c v), the truncated normal. Every other feature (a root, a free feature, a child
outside an exclusive group) draws one word per sample: fires when u < q_f (u = (U + 1/2) 2^-32),
and g = Phi^-1(u / q_f), u / q_f ~ U(0, 1) independent of the firing.

Slots: the features not in an exclusive group ("solo", in feature order), then each group's B
children (0-padded to the largest group) in breadth-first order of the groups' depth. The values
V (N x P slots) are gated stage by stage in increasing depth (a child times [a_q > 0], or a_q /
mu_q when its parent scales its children), block by block as each is made (`blocks`: V is never
written whole), then x = V @ W_slots + b (`inputs`: on the CPU only the rows of W_slots that a
sample's nonzeros select, `native.sparse_rows`) and a = V[:, slot_of_f]. On the CPU the draws
are native kernels on the same words (`native.synth_solo`, `native.synth_groups`): they compute
q and Phi^-1 only where u may be under q, and draw no group whose gate is 0 (its parent is off),
where XLA computes both for every slot and gates each block after drawing it.
Index arrays that are ranges are sliced (`Run`), as in `synth_world`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae_jax import native

Array = jax.Array
Run = tuple[int, int] | None
_TWO_M32 = 2.0 ** -32
_OPEN = float(np.nextafter(np.float32(1), np.float32(0)))  # largest float32 below 1
_TOP = float(np.nextafter(np.float32(2.0 ** 32), np.float32(0)))  # largest float32 below 2^32


def _run(idx: np.ndarray) -> Run:
    """(start, 1) when idx = start + arange(K), else None."""
    idx = np.asarray(idx).reshape(-1)
    if idx.size and np.array_equal(idx, idx[0] + np.arange(idx.size)):
        return int(idx[0]), 1
    return None


def _cols(v: Array, idx: Array, run: Run) -> Array:
    return v[:, idx] if run is None else jax.lax.slice_in_dim(v, run[0], run[0] + idx.shape[0], axis=1)


@struct.dataclass
class Stage:
    """One depth of the forest: its solo children (slots, their parents' slots, rescale flags,
    parents' mu) and its exclusive groups, a block of B x G slots from `start` (child b of group g
    at start + b G + g), with each group's effective parent's slot (`gated` False: none)."""

    solo_K: Array
    solo_parent_K: Array
    solo_rescale_K: Array
    solo_mean_K: Array
    grp_parent_G: Array
    grp_gated_G: Array
    grp_rescale_G: Array
    grp_mean_G: Array
    start: int = struct.field(pytree_node=False, default=0)
    solo_run: Run = struct.field(pytree_node=False, default=None)
    solo_parent_run: Run = struct.field(pytree_node=False, default=None)
    grp_parent_run: Run = struct.field(pytree_node=False, default=None)


@struct.dataclass
class Slots:
    """The slot layout's arrays (P = S + G B slots; padding slots never fire, W row 0)."""

    w_PxD: Array
    corr_PxR: Array
    thresh_P: Array
    probs_P: Array
    mean_P: Array
    std_P: Array
    pos_P: Array  # r_f = P(mu_f + sigma_f g > 0)
    slot_F: Array  # int32: each feature's slot
    stages: tuple[Stage, ...]  # depth 0 (groups without a parent), 1, 2, ...
    solo: int = struct.field(pytree_node=False, default=0)
    groups: int = struct.field(pytree_node=False, default=0)
    width: int = struct.field(pytree_node=False, default=0)  # B
    nodes: tuple[float, ...] = struct.field(pytree_node=False, default=())  # Gauss-Legendre on [0, 1]
    weights: tuple[float, ...] = struct.field(pytree_node=False, default=())


def plan(levels: Any, features_FxD: np.ndarray, corr_FxR: np.ndarray, thresh_F: np.ndarray,
         probs_F: np.ndarray, mean_F: np.ndarray, std_F: np.ndarray) -> Slots:
    """The slot layout of a forest given as `synth_world.Level`s (host arrays): solo features in
    feature order, then depth by depth a B-major block of that depth's groups, ordered by their
    parent's slot (so that a full level of parents is a slice)."""
    from scipy.special import ndtr

    f = features_FxD.shape[0]
    parent: dict[int, tuple[int, bool]] = {}
    groups: list[list[int]] = []
    for lv in levels:
        for c, q, r in zip(np.asarray(lv.feat_K), np.asarray(lv.parent_K), np.asarray(lv.rescale_K)):
            parent[int(c)] = (int(q), bool(r))
        for kids, ok in zip(np.asarray(lv.sib_GxB), np.asarray(lv.valid_GxB)):
            groups.append([int(k) for k, v in zip(kids, ok) if v])
    depth: dict[int, int] = {}

    def dep(c: int) -> int:
        if c not in depth:
            depth[c] = 0 if c not in parent else dep(parent[c][0]) + 1
        return depth[c]

    in_group = {c for g in groups for c in g}
    solo = [c for c in range(f) if c not in in_group]
    b = max((len(g) for g in groups), default=0)
    slot_F = np.full(f, -1, np.int64)
    slot_F[solo] = np.arange(len(solo))
    feat_P = list(solo)
    mean = np.asarray(mean_F, np.float64)
    stages = []
    for d in range(max([dep(c) for c in range(f)], default=0) + 1):
        kids = [c for c in solo if c in parent and dep(c) == d]
        here = [g for g in groups if dep(g[0]) == d]
        gp = [parent.get(g[0], (-1, False)) for g in here]
        order = sorted(range(len(here)), key=lambda i: slot_F[gp[i][0]] if gp[i][0] >= 0 else -1)
        here, gp = [here[i] for i in order], [gp[i] for i in order]
        start = len(feat_P)
        for i in range(b):
            for j, g in enumerate(here):
                if i < len(g):
                    slot_F[g[i]] = start + i * len(here) + j
                feat_P.append(g[i] if i < len(g) else -1)
        if not kids and not any(q >= 0 for q, _ in gp) and d:
            continue
        ks = slot_F[kids].astype(np.int32)
        kp = slot_F[[parent[c][0] for c in kids]].astype(np.int32)
        gps = np.array([slot_F[q] if q >= 0 else 0 for q, _ in gp], np.int32)
        stages.append(Stage(
            jnp.asarray(ks), jnp.asarray(kp), jnp.asarray(np.array([parent[c][1] for c in kids], bool)),
            jnp.asarray(mean[[parent[c][0] for c in kids]].astype(np.float32)),
            jnp.asarray(gps), jnp.asarray(np.array([q >= 0 for q, _ in gp], bool)),
            jnp.asarray(np.array([r for _, r in gp], bool)),
            jnp.asarray(np.array([mean[q] if q >= 0 else 1.0 for q, _ in gp], np.float32)),
            start, _run(ks), _run(kp), _run(gps) if all(q >= 0 for q, _ in gp) else None))
    feat = np.array(feat_P, np.int64)

    def per_slot(a: np.ndarray, pad: float = 0.0) -> Array:
        a = np.asarray(a, np.float64)
        out = np.where((feat >= 0).reshape((-1,) + (1,) * (a.ndim - 1)), a[np.maximum(feat, 0)], pad)
        return jnp.asarray(out, jnp.float32)

    std = np.asarray(std_F, np.float64)
    pos = np.where(std > 0, ndtr(mean / np.where(std > 0, std, 1.0)), (mean > 0).astype(np.float64))
    x, wq = np.polynomial.legendre.leggauss(max(1, -(-b // 2)))
    return Slots(per_slot(features_FxD), per_slot(corr_FxR), per_slot(thresh_F, 1e30), per_slot(probs_F),
                 per_slot(mean_F), per_slot(std_F), per_slot(pos), jnp.asarray(slot_F.astype(np.int32)),
                 tuple(stages), len(solo), len(groups), b, tuple(float(t) for t in (x + 1) / 2),
                 tuple(float(t) for t in wq / 2))


def words(key: Array, shape: tuple[int, int]) -> Array:
    """Uniform 32-bit words (uint32, shape (n, k)): with a threefry key, both output words of
    each Threefry-2x32 hash of the counters (0, i) (`jax.random.bits` keeps one word per hash,
    their xor, under jax_threefry_partitionable); other key types: `jax.random.bits`."""
    n, k = shape
    data = jax.random.key_data(key)
    if data.shape != (2,) or n * k >= 2 ** 32:
        return jax.random.bits(key, shape, jnp.uint32)
    half = -(-k // 2)
    count = jax.lax.iota(jnp.uint32, n * half).reshape(n, half)
    hi, lo = threefry2x32(data[0], data[1], jnp.zeros_like(count), count)
    return jnp.concatenate([hi, lo], axis=1)[:, :k]


def _rotl(x: Array, r: int) -> Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 hash (20 rounds), bit for bit `jax.extend.random.threefry2x32_p`, with
    its rounds unrolled: XLA:CPU's lowering of the primitive loops over 5 groups of 4 rounds and
    writes both words to memory after each, where this is one elementwise fusion."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    rot = ((13, 15, 26, 6), (17, 29, 16, 24))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rot[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _ndtri(y: Array) -> Array:
    """Phi^-1(y) for y in (0, 1), clipped like `jax.random.normal` (|g| <= 5.4)."""
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(jnp.clip(2.0 * y - 1.0, -_OPEN, _OPEN))


def _firing(eps_NxR: Array | None, s: Slots, lo: int, hi: int) -> Array:
    """q (N x (hi - lo)) of the slots lo..hi: Phi(eps . l_f / sqrt(c_f) - t_f), or p_f."""
    if eps_NxR is None:
        return s.probs_P[lo:hi]
    z = eps_NxR @ s.corr_PxR[lo:hi].T
    return 0.5 * jax.lax.erfc((s.thresh_P[lo:hi] - z) * np.float32(np.sqrt(0.5)))


def _winners(eps_NxR: Array | None, bits: Array, gate_NxG: Array, s: Slots, col: int, start: int, g: int) -> Array:
    """The block of G groups at slot `start` (N x B G, B-major): the winner's value times its
    group's gate in its slot, else 0; u the groups' words (columns col.. of bits)."""
    b, n = s.width, bits.shape[0]
    u = bits[:, col: col + g]
    cut = lambda a: a[start: start + b * g].reshape(b, g)
    qa = (_firing(eps_NxR, s, start, start + b * g).reshape(-1, b, g) * cut(s.pos_P))  # q'_c
    qa = jax.lax.optimization_barrier(qa)  # materialised once (XLA would redo erfc per consumer)
    win = jnp.zeros_like(qa)
    for t, wt in zip(s.nodes, s.weights):
        fac = 1.0 - qa * np.float32(1.0 - t)  # >= t > 0
        win = win + np.float32(wt) * jnp.prod(fac, axis=1, keepdims=True) / fac
    cum = jnp.cumsum(qa * win, axis=1)
    t_c = jnp.minimum(cum * np.float32(2.0 ** 32), _TOP).astype(jnp.uint32)  # N x B x G
    below = t_c <= u[:, None, :]
    lo = jnp.max(jnp.where(below, t_c, 0), axis=1)
    hi = jnp.min(jnp.where(below, jnp.uint32(0xFFFFFFFF), t_c), axis=1)
    j = jnp.sum(below, axis=1, dtype=jnp.int32)  # the winner; none when j = B
    v = ((u - lo).astype(jnp.float32) + 0.5) / jnp.maximum((hi - lo).astype(jnp.float32), 1.0)
    j, v = jax.lax.optimization_barrier((j, v))
    pick = jnp.arange(b)[:, None] == j[:, None, :]  # N x B x G
    sel = lambda a: jnp.sum(jnp.where(pick, cut(a), 0.0), axis=1)
    gw = -_ndtri(jnp.clip(sel(s.pos_P) * v, 0.0, 1.0))  # Phi^-1(1 - r v)
    val = jax.nn.relu(sel(s.mean_P) + sel(s.std_P) * gw)
    return jnp.where(pick, val[:, None, :], 0.0).reshape(n, b * g) * jnp.tile(gate_NxG, (1, b))


def blocks(key: Array, s: Slots, correlated: bool, n: int) -> list[tuple[int, Array]]:
    """V (n x P, the slots' values after the hierarchy; module docstring) as its column blocks
    (first slot, values): the solo features', then each depth's exclusive groups'. Each block is
    gated as it is made, so V is never written whole."""
    k_eps, k_u = jax.random.split(key)
    eps = jax.random.normal(k_eps, (n, s.corr_PxR.shape[1])) if correlated else None
    bits = words(k_u, (n, s.solo + s.groups))
    out = [(0, native.on_cpu(_solo_native, _solo, n * s.solo)(eps, bits, s))]
    at = s.solo
    for st in s.stages:
        out = _gate_solo(out, st)
        g = st.grp_parent_G.shape[0]
        if g:
            # the block's static ints bound here: platform_dependent would trace its arguments
            draw = [functools.partial(f, s=s, col=at, start=st.start, g=g) for f in (_winners_native, _winners)]
            out.append((st.start, native.on_cpu(*draw, n * g * s.width)(eps, bits, _group_gate(out, st))))
            at += g
    return out


def _solo(eps_NxR: Array | None, bits: Array, s: Slots) -> Array:
    """The solo slots' values (N x S): fire when u < q, magnitude from u / q."""
    q_s = _firing(eps_NxR, s, 0, s.solo)
    u = jnp.minimum((bits[:, :s.solo].astype(jnp.float32) + 0.5) * _TWO_M32, _OPEN)
    fired = u < q_s
    g = _ndtri(jnp.clip(u / jnp.where(fired, q_s, 1.0), 0.0, 1.0))
    return jnp.where(fired, jax.nn.relu(s.mean_P[:s.solo] + s.std_P[:s.solo] * g), 0.0)


_NONE = np.zeros((1, 1), np.float32)  # the native kernels' z, eps and l without a copula (not read)


def _pars(s: Slots, lo: int, hi: int) -> Array:
    """The native kernels' par (`native.SYNTH_PARS` rows) for the slots lo..hi."""
    return jnp.stack([a[lo:hi] for a in (s.thresh_P, s.probs_P, s.pos_P, s.mean_P, s.std_P)])


def _solo_native(eps_NxR: Array | None, bits: Array, s: Slots) -> Array:
    """`_solo` by `native.synth_solo`, which computes q and Phi^-1 only where u may be under q."""
    z = _NONE if eps_NxR is None else eps_NxR @ s.corr_PxR[:s.solo].T
    return native.synth_solo(z, bits, _pars(s, 0, s.solo), 0, eps_NxR is not None)


def _winners_native(eps_NxR: Array | None, bits: Array, gate_NxG: Array, s: Slots, col: int, start: int,
                    g: int) -> Array:
    """`_winners` by `native.synth_groups`, which draws no winner where the gate is 0 (and computes
    eps . l_f only for the children of the groups it draws)."""
    lo, hi = start, start + s.width * g
    quad = jnp.asarray(np.array([[1.0 - t for t in s.nodes], list(s.weights)], np.float32))
    eps, corr = (_NONE, _NONE) if eps_NxR is None else (eps_NxR, s.corr_PxR[lo:hi])
    return native.synth_groups(eps, corr, bits, _pars(s, lo, hi), quad, gate_NxG, col, eps_NxR is not None, s.width)


def values(key: Array, s: Slots, correlated: bool, n: int) -> Array:
    """V (n x P): the slots' values after the hierarchy (module docstring)."""
    return joined(blocks(key, s, correlated, n))


def joined(out: list[tuple[int, Array]]) -> Array:
    """V (n x P) from its blocks."""
    return jnp.concatenate([v for _, v in out], axis=1) if len(out) > 1 else out[0][1]


def inputs(out: list[tuple[int, Array]], s: Slots, bias_D: Array) -> Array:
    """x = V W_slots + b (n x D), summed block by block; on the CPU each block's product reads
    only the rows of W its nonzeros select (`native.sparse_rows`: a row of V holds a few dozen
    nonzeros among P slots), elsewhere a GEMM."""
    x = bias_D
    for start, v in out:
        w = jax.lax.slice_in_dim(s.w_PxD, start, start + v.shape[1])
        x = x + native.on_cpu(native.sparse_rows, jnp.matmul, v.size)(v, w)
    return x


def _factor(par: Array, rescale: Array, mean: Array) -> Array:
    """[a_q > 0], or a_q / mu_q where the parent rescales its children."""
    on = par > 0
    return jnp.where(rescale, jnp.where(on, par / mean, 0.0), on.astype(par.dtype))


def _block_cols(out: list[tuple[int, Array]], idx: Array, run: Run) -> Array:
    """V[:, idx] from the blocks made so far: a slice of one block where idx is a range in it."""
    if run is not None:
        for start, v in out:
            if start <= run[0] and run[0] + idx.shape[0] <= start + v.shape[1]:
                return jax.lax.slice_in_dim(v, run[0] - start, run[0] - start + idx.shape[0], axis=1)
    return joined(out)[:, idx]


def _gate_solo(out: list[tuple[int, Array]], st: Stage) -> list[tuple[int, Array]]:
    """One depth's solo children (slots in the first block) multiplied by their parents' factor."""
    k = st.solo_K.shape[0]
    if not k:
        return out
    fac = _factor(_block_cols(out, st.solo_parent_K, st.solo_parent_run), st.solo_rescale_K, st.solo_mean_K)
    v = out[0][1]
    if st.solo_run is not None:
        cols = jax.lax.slice_in_dim(v, st.solo_run[0], st.solo_run[0] + k, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v, cols * fac, st.solo_run[0], axis=1)
    else:
        v = v.at[:, st.solo_K].multiply(fac, unique_indices=True)
    return [(0, v)] + out[1:]


def _group_gate(out: list[tuple[int, Array]], st: Stage) -> Array:
    """One depth's exclusive groups' gates (N x G): their effective parents' factor, 1 without one."""
    par = _block_cols(out, st.grp_parent_G, st.grp_parent_run)
    return jnp.where(st.grp_gated_G, _factor(par, st.grp_rescale_G, st.grp_mean_G), 1.0)


__all__ = ["Slots", "Stage", "blocks", "inputs", "joined", "plan", "threefry2x32", "values", "words"]
