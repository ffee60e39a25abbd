"""Resampling dead and duplicate latents, per cell, inside the jitted scan.

At a resampling step a latent j of a cell is *recycled* when
- it is dead: it did not fire in the last `resample_dead_window` steps (default: the period), or
- it is a duplicate: cos(D_j, D_i) > `dedup_threshold` for some earlier latent i < j.

A recycled latent gets, from the cell's pool of samples x (the worst-reconstructed training
input of each of the last K steps, so the pool costs nothing to draw and comes from the training
stream, toy or stored) and the cell's current reconstructions x^:
- decoder atom  D_j = r / ||r||, r = x - x^ of one of the `resample_worst` samples of the pool
  worst reconstructed now (chosen at random, without repeats while they last);
- encoder row   W_e[j] = s * D_j * mean_{live i} ||W_e[i]||  (all rows when none is live; the
                scale s is `resample_encoder_scale`, 1 by default);
- bias          b_e[j] = mean_{live i} b_e[i]  (0 when none is live);
- its Adam first and second moments are zeroed and its fired counter restarts.
Nothing changes in a cell where no latent qualifies, or in a diverged cell.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from sae_jax import archs, sae
from sae_jax.errors import UsageError
from sae_jax.knobs import RESAMPLING, knob

Array = jax.Array


class GroupState(Protocol):
    """What resampling reads and writes of a group's (or, unbatched, one cell's) state: the
    fields of `grid.GroupState` (which imports this module, so it is described here)."""

    params: sae.SAEParams
    opt: Any
    since_fired: Array
    n_resampled: Array
    diverged: Array
    valid: Array
    pool_x: Array
    arch: archs.Arch

    @property
    def dict_size(self) -> int: ...

    def replace(self, **changes: Any) -> "GroupState": ...


class GridState(Protocol):
    """What resampling reads and writes of `grid.GridState`."""

    groups: tuple[GroupState, ...]
    step: Array
    data_key: Array

    def replace(self, **changes: Any) -> "GridState": ...



@dataclasses.dataclass(frozen=True)
class ResampleConfig:
    """When and how dead and duplicate latents are recycled (`every` = 0: never)."""

    every: int = knob(0, "resample at steps that are multiples of this (0: never)", group=RESAMPLING, parse=int)
    pool: int = knob(0, "K: the pool keeps each of the last K steps' worst-reconstructed input, per cell "
                        "(default: the period)", group=RESAMPLING, parse=int)
    worst: int = knob(0, "new atoms come from the pool's n currently worst (default: all)",
                      group=RESAMPLING, parse=int)
    dead_window: int = knob(0, "dead = did not fire in this many steps (default: the whole period)",
                            group=RESAMPLING, parse=int)
    dedup_threshold: float = knob(0.0, "also recycle atoms with cosine > this to an earlier atom (0: off)",
                                  group=RESAMPLING, parse=float)
    encoder_scale: float = knob(1.0, "new encoder row = scale x direction x mean live row norm (default 1)",
                                group=RESAMPLING, parse=float)
    until: int = knob(0, "last step that may resample (0: no limit)", group=RESAMPLING, parse=int)

    def validate(self) -> "ResampleConfig":
        for f in ("every", "pool", "worst", "dead_window", "until"):
            if getattr(self, f) < 0:
                raise UsageError(f"`{_name(f)}` must be >= 0, got {getattr(self, f)}", field=_name(f))
        if self.every and self.pool_size > self.every:
            raise UsageError(f"`resample_pool` ({self.pool}) must be <= `resample_every` ({self.every}): "
                             "the pool holds one sample per step since the last resampling",
                             field="resample_pool")
        if self.every and self.worst > self.pool_size:
            raise UsageError(f"`resample_worst` ({self.worst}) must be <= the pool size ({self.pool_size})",
                             field="resample_worst")
        if not (math.isfinite(self.encoder_scale) and self.encoder_scale > 0):
            raise UsageError(f"`resample_encoder_scale` must be > 0, got {self.encoder_scale}",
                             field="resample_encoder_scale")
        if not math.isfinite(self.dedup_threshold):
            raise UsageError(f"`dedup_threshold` must be finite, got {self.dedup_threshold}",
                             field="dedup_threshold")
        if not (0 <= self.dedup_threshold < 1):
            raise UsageError(f"`dedup_threshold` must be in [0, 1), got {self.dedup_threshold}",
                             field="dedup_threshold")
        return self

    @property
    def pool_size(self) -> int:
        """Rows of each cell's resampling pool (1 placeholder row when resampling is off)."""
        return (self.pool or self.every) if self.every else 1

    @property
    def n_worst(self) -> int:
        return self.worst or self.pool_size


# Each field's name outside this module (in recipes, errors and flags): field -> its name here.
FIELDS = {("dedup_threshold" if f.name == "dedup_threshold" else f"resample_{f.name}"): f.name
          for f in dataclasses.fields(ResampleConfig)}


def _name(field: str) -> str:
    return next(k for k, v in FIELDS.items() if v == field)


def duplicate_mask(atoms_MxD: Array, threshold: float, block: int = 512) -> Array:
    """(M,) True where cos(D_j, D_i) > threshold for some earlier i < j; built block x M at a
    time so the M x M similarity matrix never exists."""
    m = atoms_MxD.shape[0]
    b = min(block, m)
    n_blocks = -(-m // b)
    rows = jnp.pad(atoms_MxD, ((0, n_blocks * b - m), (0, 0))).reshape(n_blocks, b, -1)
    idx = jnp.arange(n_blocks * b).reshape(n_blocks, b)

    def one(args):
        blk, j = args
        earlier = jnp.arange(m)[None, :] < j[:, None]
        return jnp.any(earlier & (blk @ atoms_MxD.T > threshold), axis=1)
    return jax.lax.map(one, (rows, idx)).reshape(-1)[:m]


def recycle_mask(params: sae.SAEParams, since_fired_M: Array, dead_window: int,
                 dedup_threshold: float) -> Array:
    """Boolean (M,): dead latents, plus atoms with cosine > threshold to an earlier atom."""
    mask = since_fired_M >= dead_window
    if dedup_threshold:
        mask |= duplicate_mask(sae.dictionary(params), dedup_threshold)
    return mask


def _zero_rows(tree: sae.SAEParams, mask_M: Array) -> sae.SAEParams:
    """The rows of the masked latents zeroed in every per-latent leaf (the decoder bias is not
    per latent: it keeps its moments)."""
    zero = lambda a: jnp.where(mask_M.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a)
    return jax.tree.map(zero, tree._replace(b_dec_D=None))._replace(b_dec_D=tree.b_dec_D)


def resample_cell(cell: GroupState, pool_PxD: Array, key: Array, dead_window: int,
                  dedup_threshold: float, n_worst: int, encoder_scale: float = 1.0) -> GroupState:
    """Recycles one cell's dead and duplicate latents (unbatched `grid.GroupState` leaves)."""
    p = cell.params
    mask = recycle_mask(p, cell.since_fired, dead_window, dedup_threshold) & ~cell.diverged
    err = jnp.sum(jnp.square(pool_PxD - sae.decode(p, archs.encode(p, pool_PxD, cell.arch))), axis=1)
    worst = jnp.argsort(-err)[:n_worst]  # (a sort partitions over a sharded cell axis; top_k does not)
    rank = jnp.cumsum(mask) - 1
    pick = worst[jax.random.permutation(key, n_worst)[rank % n_worst]]
    resid = pool_PxD[pick] - sae.decode(p, archs.encode(p, pool_PxD[pick], cell.arch))
    direction = sae.unit_rows(resid)
    live = ~mask
    any_live = jnp.any(live)
    n_live = jnp.maximum(jnp.sum(live), 1)
    norms = jnp.linalg.norm(p.W_enc_MxD, axis=1)
    # With no live latent left: the mean norm of all rows and a zero bias, so the new latents fire.
    enc_norm = jnp.where(any_live, jnp.sum(norms * live) / n_live, jnp.mean(norms))
    bias = jnp.where(any_live, jnp.sum(p.b_enc_M * live) / n_live, 0.0)
    col = mask[:, None]
    params = p._replace(
        W_enc_MxD=jnp.where(col, direction * (encoder_scale * enc_norm), p.W_enc_MxD),
        b_enc_M=jnp.where(mask, bias, p.b_enc_M),
        D_MxD=jnp.where(col, direction, p.D_MxD),
    )
    params = cell.arch.record.recycle(params, p, mask, live)  # e.g. JumpReLU's threshold
    opt = cell.opt._replace(mu=_zero_rows(cell.opt.mu, mask), nu=_zero_rows(cell.opt.nu, mask))
    return cell.replace(params=params, opt=opt,
                        since_fired=jnp.where(mask, 0, cell.since_fired),
                        n_resampled=cell.n_resampled + jnp.sum(mask).astype(jnp.int32))


def resample_grid(state: GridState, cfg: ResampleConfig, mesh: jax.sharding.Mesh | None = None) -> GridState:
    """Resamples every cell of every group from its own pool (vmapped, so a sharded cell axis
    stays local; a group that selects by top-k runs per device under `mesh`, see
    `grid._local_update`)."""
    key = jax.random.fold_in(jax.random.fold_in(state.data_key, state.step), 0x5EED)
    window = cfg.dead_window or cfg.every
    groups = []
    for g in state.groups:
        n = g.valid.shape[0]
        # One key for the whole group: a cell's resampling must not depend on its slot.
        k = jax.random.fold_in(key, g.dict_size)
        keys = jnp.broadcast_to(k, (n,) + k.shape)
        fn = lambda cell, k: resample_cell(cell, cell.pool_x, k, window, cfg.dedup_threshold,
                                           cfg.n_worst, cfg.encoder_scale)
        update = jax.vmap(fn)
        if mesh is not None and g.arch.uses_k:
            cells = jax.sharding.PartitionSpec("grid")
            update = jax.shard_map(update, mesh=mesh, in_specs=(cells, cells), out_specs=cells, check_vma=False)
        groups.append(update(g, keys))
    return state.replace(groups=tuple(groups))


def maybe_resample(state: GridState, cfg: ResampleConfig, mesh: jax.sharding.Mesh | None = None) -> GridState:
    """`resample_grid` at steps that are multiples of `every`, up to `until`."""
    if not cfg.every:
        return state
    due = (state.step % cfg.every == 0)
    if cfg.until:
        due &= state.step <= cfg.until
    return jax.lax.cond(due, lambda s: resample_grid(s, cfg, mesh), lambda s: s, state)
