"""A whole grid of SAEs (L1 coefficient x dictionary size x seed) trained in one jitted step.

Cells are grouped by dictionary size. Each group is one pytree whose leaves carry a leading cell
axis C; the step is a tuple of `jax.vmap`-ed updates, one per group, compiled together, so a
256-latent SAE is never padded up to 8192 latents. Per-cell hyperparameters (alpha, learning
rate) are arrays in the state, so they are checkpointed and sharded with the parameters.

Every cell of a step sees the same batch, drawn from key fold_in(data_key, step); a cell's
initial parameters depend only on (init key, dictionary size, seed). Hence a cell trained
inside a grid equals the same cell trained alone, and the result does not depend on how the
steps are chunked or resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sae_jax import fused, resample, sae, toy
from sae_jax.config import TrainConfig  # noqa: F401  (re-exported: grid.TrainConfig)
from sae_jax.errors import UsageError

Array = jax.Array


# ----------------------------------------------------------------------------- specification
@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One cell of the grid: its hyperparameters and where its state lives."""

    index: int
    l1_coeff: float  # alpha
    dict_size: int
    ratio: float
    seed: int
    group: int
    slot: int  # position inside its size group
    noise: float = 0.0  # input-noise std (denoising grids)
    world_value: float | None = None  # the world knob's value (grids with a world axis)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The grid: every (alpha, dict_size, noise, seed). Cells are ordered size-major, then alpha,
    then input-noise std (denoising; (0,) for plain autoencoders), then seed."""

    l1_coeff: tuple[float, ...]  # alpha
    dict_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    features: int | None = None  # h, when sizes came from ratios (for reporting only)
    noise: tuple[float, ...] = (0.0,)
    world_axis: str = ""  # a toy-world knob swept in the same step (`toy.axis_worlds`); "": none
    world_values: tuple[float, ...] = ()

    @classmethod
    def from_ratios(cls, l1_coeff: Sequence[float], ratios: Sequence[float], features: int,
                    seeds: int | Sequence[int] = 1, noise: Sequence[float] = (0.0,),
                    world_axis: str = "", world_values: Sequence[float] = ()) -> "GridSpec":
        """Dictionary sizes m = round(ratio * features)."""
        _check_positive("ratios", ratios)
        sizes = tuple(max(1, int(round(r * features))) for r in ratios)
        if isinstance(seeds, int):
            if seeds < 1:
                raise UsageError(f"`seeds` must be >= 1, got {seeds}", field="seeds")
            seeds = tuple(range(seeds))
        return cls(tuple(float(a) for a in l1_coeff), sizes, tuple(seeds), features,
                   tuple(float(n) for n in noise), world_axis,
                   tuple(float(v) for v in world_values)).validate()

    def validate(self) -> "GridSpec":
        if not self.l1_coeff:
            raise UsageError("`l1_coeff` needs at least one value", field="l1_coeff")
        for a in self.l1_coeff:
            if not (math.isfinite(a) and a >= 0):
                raise UsageError(f"`l1_coeff` values must be finite and >= 0, got {a}", field="l1_coeff")
        if not self.dict_sizes:
            raise UsageError("`dict_sizes` needs at least one value", field="dict_sizes")
        _check_positive("dict_sizes", self.dict_sizes)
        if any(m != int(m) for m in self.dict_sizes):
            raise UsageError(f"dictionary sizes must be integers, got {list(self.dict_sizes)}", field="dict_sizes")
        if len(set(self.dict_sizes)) != len(self.dict_sizes):
            raise UsageError(f"dictionary sizes must be distinct, got {list(self.dict_sizes)}", field="dict_sizes")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"`seeds` must be >= 1 distinct seeds, got {list(self.seeds)}", field="seeds")
        for n in self.noise:
            if not (math.isfinite(n) and n >= 0):
                raise UsageError(f"noise std values must be finite and >= 0, got {n}", field="noise")
        toy.check_world_axis(self.world_axis, self.world_values, self.denoising)
        return self

    @property
    def denoising(self) -> bool:
        return any(n > 0 for n in self.noise)

    def ratio(self, m: int) -> float:
        return m / self.features if self.features else float(m)

    def cells(self) -> list[CellSpec]:
        out = []
        for g, m in enumerate(self.dict_sizes):
            slot = 0
            for a in self.l1_coeff:
                for n in self.noise:
                    for w in (self.world_values or (None,)):
                        for s in self.seeds:
                            out.append(CellSpec(len(out), a, m, self.ratio(m), s, g, slot, n, w))
                            slot += 1
        return out

    def to_dict(self) -> dict:
        """As results.json and checkpoints record it (alpha under `l1`; lists)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {("l1" if k == "l1_coeff" else k): v for k, v in d.items()
                if self.world_axis or k not in ("world_axis", "world_values")}  # (as before axes)


def _check_positive(name: str, values: Iterable[float]) -> None:
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"`{name}` must be > 0, got {v}", field=name)


# ----------------------------------------------------------------------------- state
@struct.dataclass
class GroupState:
    """The state of one size group's cells; every leaf has a leading cell axis C."""

    params: sae.SAEParams
    opt: optax.ScaleByAdamState
    l1_coeff: Array  # (C,)
    lr: Array  # (C,)
    noise: Array  # (C,) input-noise std
    since_fired: Array  # (C, M) int32: steps since the latent last fired
    diverged: Array  # (C,) bool: loss went non-finite; the cell stopped updating
    n_resampled: Array  # (C,) int32
    valid: Array  # (C,) bool: False for inert padding cells
    pool_x: Array  # (C, K, d): the worst-reconstructed input of each of the last K steps (the
    #                resampling pool; row t mod K is written at step t)
    world_index: Array | None = None  # (C,) int32: the cell's world value (index into world_values)

    @property
    def dict_size(self) -> int:
        return self.params.D_MxD.shape[-2]


@struct.dataclass
class GridState:
    groups: tuple[GroupState, ...]
    step: Array  # () int32
    data_key: Array  # raw uint32 PRNG key


class StepMetrics(struct.PyTreeNode):
    loss: tuple[Array, ...]  # per group, (C,)
    mse: tuple[Array, ...]


def cell_key(init_key: Array, dict_size: int, seed: int) -> Array:
    """A cell's init key: depends on its size and seed only, so alpha-neighbours share inits."""
    return jax.random.fold_in(jax.random.fold_in(init_key, dict_size), seed)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_group(keys: Array, d: int, m: int, tied: bool) -> sae.SAEParams:
    """Every cell's parameters of one size group (jitted: the same values as eager, compiled once
    instead of op by op)."""
    return jax.vmap(lambda k: sae.init(k, d, m, tied))(keys)


def init_grid(key: Array, spec: GridSpec, d: int, cfg: TrainConfig = TrainConfig(),
              pad_multiple: int = 1) -> GridState:
    """Initial state: every cell's SAE, Adam moments, counters; each group padded with inert
    cells (lr = 0, valid = False) to a multiple of `pad_multiple`."""
    spec.validate()
    cfg.validate()
    init_key, data_key = jax.random.split(key)
    cells = spec.cells()
    groups = []
    for g, m in enumerate(spec.dict_sizes):
        mine = [c for c in cells if c.group == g]
        keys = jnp.stack([cell_key(init_key, m, c.seed) for c in mine])
        params = _init_group(keys, d, m, cfg.tied_init)
        groups.append(GroupState(
            params=params,
            opt=jax.vmap(cfg.adam().init)(params),
            l1_coeff=jnp.asarray([c.l1_coeff for c in mine], jnp.float32),
            noise=jnp.asarray([c.noise for c in mine], jnp.float32),
            lr=jnp.full((len(mine),), cfg.lr, jnp.float32),
            since_fired=jnp.zeros((len(mine), m), jnp.int32),
            diverged=jnp.zeros((len(mine),), bool),
            n_resampled=jnp.zeros((len(mine),), jnp.int32),
            valid=jnp.ones((len(mine),), bool),
            pool_x=jnp.zeros((len(mine), cfg.resample.pool_size, d), jnp.float32),
            world_index=(jnp.asarray([spec.world_values.index(c.world_value) for c in mine], jnp.int32)
                         if spec.world_axis else None),
        ))
    return pad(GridState(tuple(groups), jnp.zeros((), jnp.int32), data_key), pad_multiple)


def pad(state: GridState, multiple: int) -> GridState:
    """Pads each group with copies of its last cell made inert (lr 0, valid False) up to a
    multiple of `multiple` cells. Inert cells never show in results."""
    def one(g: GroupState) -> GroupState:
        n_pad = (-g.valid.shape[0]) % multiple
        if not n_pad:
            return g
        grow = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], n_pad, axis=0)])
        g = jax.tree.map(grow, g)
        inert = jnp.arange(g.valid.shape[0]) >= g.valid.shape[0] - n_pad
        return g.replace(lr=jnp.where(inert, 0.0, g.lr), valid=g.valid & ~inert)
    return state.replace(groups=tuple(one(g) for g in state.groups))


def unpad(state: GridState, spec: GridSpec) -> GridState:
    """The state without inert padding cells (what checkpoints hold, so that a run can resume
    on a different number of devices)."""
    counts = [sum(1 for c in spec.cells() if c.group == g) for g in range(len(spec.dict_sizes))]
    return state.replace(groups=tuple(jax.tree.map(lambda a: a[:n], g)
                                      for g, n in zip(state.groups, counts)))


# ----------------------------------------------------------------------------- the step
def _schedules(step: Array, cfg: TrainConfig) -> tuple[Array, Array]:
    """(learning-rate multiplier, alpha multiplier) at `step`."""
    t = step.astype(jnp.float32)
    lr_mult = jnp.float32(1.0)
    if cfg.lr_warmup:
        lr_mult = jnp.minimum(1.0, (t + 1) / cfg.lr_warmup)
    if cfg.lr_decay_steps:
        lr_mult = lr_mult * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / cfg.lr_decay_steps, 1.0)))
    l1_mult = jnp.minimum(1.0, (t + 1) / cfg.l1_warmup) if cfg.l1_warmup else jnp.float32(1.0)
    return lr_mult, l1_mult


def _all_finite(tree: Any) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _sq_norm(tree: Any) -> Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def cell_update(cell: GroupState, x_BxD: Array, eps_BxD: Array | None, lr_mult: Array, l1_mult: Array,
                cfg: TrainConfig, step: Array) -> tuple[GroupState, tuple[Array, Array]]:
    """One Adam step of one cell (unbatched leaves) on input x + noise * eps, target x, with the
    gradient of `sae.loss` by autodiff (the float32 reference path)."""
    x_in = x_BxD if eps_BxD is None else x_BxD + cell.noise * eps_BxD
    (total, aux), grads = jax.value_and_grad(sae.loss, has_aux=True)(
        cell.params, x_in, cell.l1_coeff * l1_mult, cfg.l1_convention, x_BxD)
    return apply_grads(cell, grads, total, aux, x_BxD, lr_mult, cfg, step)


def apply_grads(cell: GroupState, grads: sae.SAEParams, total: Array, aux: sae.LossAux,
                x_BxD: Array, lr_mult: Array, cfg: TrainConfig,
                step: Array) -> tuple[GroupState, tuple[Array, Array]]:
    """Adam on one cell's gradients. A non-finite loss or gradient marks the cell diverged; it
    keeps its last finite state. With resampling on, the batch's worst-reconstructed target goes
    to pool row step mod K."""
    updates, opt = cfg.adam().update(grads, cell.opt)
    params = jax.tree.map(lambda p, u: p - cell.lr * lr_mult * u, cell.params, updates)
    if cfg.full_finite_check:  # every gradient and updated parameter element
        finite = _all_finite(grads) & _all_finite(params)
    else:  # one fused reduction; the squared norm overflows before Adam's bounded step could
        finite = jnp.isfinite(_sq_norm(grads))
    diverged = cell.diverged | ~(jnp.isfinite(total) & finite)
    keep = lambda new, old: jnp.where(diverged, old, new)
    new = cell.replace(
        params=jax.tree.map(keep, params, cell.params),
        opt=jax.tree.map(keep, opt, cell.opt),
        since_fired=keep(jnp.where(aux.fired_M, 0, cell.since_fired + 1), cell.since_fired),
        diverged=diverged,
    )
    if cfg.resample.every:
        worst = x_BxD[jnp.argmax(aux.sq_err_B)].astype(jnp.float32)
        new = new.replace(pool_x=cell.pool_x.at[step % cfg.resample.pool_size].set(worst))
    return new, (total, aux.mse)


def group_update(group: GroupState, x_BxD: Array, eps_BxD: Array | None, lr_mult: Array,
                 l1_mult: Array, cfg: TrainConfig,
                 step: Array) -> tuple[GroupState, tuple[Array, Array]]:
    """One Adam step of every cell of a size group. With `cfg.fused_step` (always in bfloat16)
    the whole group's gradients come from `fused.group_loss_and_grad`; otherwise from autodiff,
    cell by cell under vmap. A world axis's x is (V, B, d): each cell trains on its value's."""
    if group.world_index is not None:
        x_BxD = x_BxD[group.world_index]  # (C, B, d)
    per_cell = 0 if x_BxD.ndim == 3 else None
    if not cfg.uses_fused_step:
        return jax.vmap(cell_update, in_axes=(0, per_cell, None, None, None, None, None))(
            group, x_BxD, eps_BxD, lr_mult, l1_mult, cfg, step)
    x_in = x_BxD if eps_BxD is None else x_BxD + group.noise[:, None, None] * eps_BxD
    (total, aux), grads = fused.group_loss_and_grad(
        group.params, x_in, group.l1_coeff * l1_mult, cfg.l1_convention, x_BxD, cfg.compute_dtype)
    return jax.vmap(apply_grads, in_axes=(0, 0, 0, 0, per_cell, None, None, None))(
        group, grads, total, aux, x_BxD, lr_mult, cfg, step)


def train_step(state: GridState, x_BxD: Array, cfg: TrainConfig,
               eps_BxD: Array | None = None) -> tuple[GridState, StepMetrics]:
    """Updates every cell of every size group on one shared batch (eps: shared input noise)."""
    lr_mult, l1_mult = _schedules(state.step, cfg)
    outs = [group_update(g, x_BxD, eps_BxD, lr_mult, l1_mult, cfg, state.step) for g in state.groups]
    groups = tuple(o[0] for o in outs)
    metrics = StepMetrics(tuple(o[1][0] for o in outs), tuple(o[1][1] for o in outs))
    return state.replace(groups=groups, step=state.step + 1), metrics


def toy_batch(world: toy.ToyWorld | tuple[toy.ToyWorld, ...], key: Array, batch_size: int,
              denoise: bool = False) -> tuple[Array, Array | None]:
    """(x, eps): a toy batch ((V, B, d) for a world axis's worlds) and, when denoising, standard
    normal noise of the same shape."""
    k_x, k_n = jax.random.split(key)
    x = toy.sample_inputs(k_x, world, batch_size)
    return x, (jax.random.normal(k_n, x.shape) if denoise else None)


def _chunk_metrics(metrics: StepMetrics) -> StepMetrics:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), metrics)


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps"))
def run_toy_chunk(state: GridState, world: toy.ToyWorld | tuple[toy.ToyWorld, ...], cfg: TrainConfig,
                  n_steps: int) -> tuple[GridState, StepMetrics]:
    """n_steps grid steps with the toy sampler fused in (one compiled lax.scan)."""
    def body(s, _):
        key = jax.random.fold_in(s.data_key, s.step)
        x, eps = toy_batch(world, key, cfg.batch_size, cfg.denoise)
        s, m = train_step(s, x, cfg, eps)
        return resample.maybe_resample(s, cfg.resample), m
    state, metrics = jax.lax.scan(body, state, None, length=n_steps)
    return state, _chunk_metrics(metrics)


@functools.partial(jax.jit, static_argnames=("cfg",))
def run_batches_chunk(state: GridState, xs_TxBxD: Array, cfg: TrainConfig) -> tuple[GridState, StepMetrics]:
    """One grid step per given batch (e.g. streamed from an activation store), one lax.scan.
    The resampling pool fills from the same stream, exactly as with the toy sampler."""
    def body(s, x):
        s, m = train_step(s, x, cfg)
        return resample.maybe_resample(s, cfg.resample), m
    state, metrics = jax.lax.scan(body, state, xs_TxBxD)
    return state, _chunk_metrics(metrics)


@jax.jit
def _mean_loss(losses: tuple[Array, ...], valid: tuple[Array, ...]) -> Array:
    """Mean loss over real, non-NaN cells: one replicated scalar, fetchable on any process."""
    loss, ok = jnp.concatenate(losses), jnp.concatenate(valid) & ~jnp.isnan(jnp.concatenate(losses))
    return jnp.sum(jnp.where(ok, loss, 0.0)) / jnp.sum(ok)


def train(state: GridState, cfg: TrainConfig, n_steps: int, *,
          world: toy.ToyWorld | tuple[toy.ToyWorld, ...] | None = None,
          batches: Callable[[int, int], np.ndarray] | None = None, chunk: int = 250,
          callback: Callable[[GridState, StepMetrics], None] | None = None,
          progress: bool = True) -> GridState:
    """Trains until state.step == n_steps, in jitted chunks of `chunk` steps.

    Data come from the toy `world` (sampled on device) or from `batches(start_step, T)`, which
    returns a (T, B, d) array of the batches for steps start_step .. start_step+T-1. After each
    chunk `callback(state, chunk_metrics)` runs on the host (checkpoints, recovery tracking).
    """
    if (world is None) == (batches is None) or n_steps < 1:
        raise UsageError(f"train() needs exactly one of world= or batches=, and `steps` >= 1 (got "
                         f"{n_steps})", field="steps")
    from tqdm.auto import tqdm
    start = int(state.step)
    bar = tqdm(total=n_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    while int(state.step) < n_steps:
        t0 = int(state.step)
        n = min(chunk, n_steps - t0)
        if world is not None:
            state, metrics = run_toy_chunk(state, world, cfg, n)
        else:
            state, metrics = run_batches_chunk(state, jnp.asarray(batches(t0, n)), cfg)
        if progress:
            loss = _mean_loss(metrics.loss, tuple(g.valid for g in state.groups))
            bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
        bar.update(n)
        if callback is not None:
            callback(state, metrics)
    bar.close()
    return state


def cell_params(state: GridState, cell: CellSpec) -> sae.SAEParams:
    """One cell's parameters, unbatched."""
    return jax.tree.map(lambda a: a[cell.slot], state.groups[cell.group].params)


def cell_field(state: GridState, cell: CellSpec, name: str) -> Array:
    return getattr(state.groups[cell.group], name)[cell.slot]
