"""A whole grid of SAEs (architecture x sparsity x dictionary size x seed) trained in one jitted step.

Cells are grouped by (architecture, dictionary size, and k for TopK/BatchTopK): everything static
about a cell is its group's. Each group is one pytree whose leaves carry a leading cell axis C;
the step is a tuple of `jax.vmap`-ed updates, one per group, compiled together, so a 256-latent
SAE is never padded up to 8192 latents. Per-cell hyperparameters (alpha or lambda, learning
rate) are arrays in the state, so they are checkpointed and sharded with the parameters.

Every cell of a step sees the same batch, drawn from key fold_in(data_key, step); a cell's
initial parameters depend only on (init key, dictionary size, seed). Hence a cell trained
inside a grid equals the same cell trained alone, and the result does not depend on how the
steps are chunked or resumed.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sae_jax import adam, archs, fused, resample, sae, synth_world, toy
from sae_jax.config import TrainConfig  # noqa: F401  (re-exported: grid.TrainConfig)
from sae_jax.errors import UsageError
from sae_jax.spec import CellSpec, GridSpec  # noqa: F401  (re-exported: grid.CellSpec, grid.GridSpec)

Array = jax.Array


# ----------------------------------------------------------------------------- state
@struct.dataclass
class GroupState:
    """The state of one group's cells; every leaf has a leading cell axis C."""

    params: sae.SAEParams
    opt: optax.ScaleByAdamState
    l1_coeff: Array  # (C,) the sparsity coefficient: alpha (relu_l1), lambda (jumprelu), else 0
    lr: Array  # (C,)
    noise: Array  # (C,) input-noise std
    since_fired: Array  # (C, M) int32: steps since the latent last fired
    diverged: Array  # (C,) bool: loss went non-finite; the cell stopped updating
    n_resampled: Array  # (C,) int32
    valid: Array  # (C,) bool: False for inert padding cells
    pool_x: Array  # (C, K, d): the worst-reconstructed input of each of the last K steps (the
    #                resampling pool; row t mod K is written at step t)
    world_index: Array | None = None  # (C,) int32: the cell's world value (index into world_values)
    arch: archs.Arch = struct.field(pytree_node=False, default=archs.RELU_L1)  # static

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
              pad_multiple: int = 1, x_init: Array | None = None) -> GridState:
    """Initial state: every cell's SAE, Adam moments, counters; each group padded with inert
    cells (lr = 0, valid = False) to a multiple of `pad_multiple` (`padded_size`). With a
    decoder bias (`cfg.decoder_bias` "mean" or "median") every cell's b_dec starts at that
    statistic of the data sample `x_init` (N, d)."""
    spec.validate()
    cfg.validate()
    b_dec = cfg.initial_decoder_bias(d, x_init)
    init_key, data_key = jax.random.split(key)
    cells = spec.cells()
    groups = []
    # Everything but the parameters is built on the host and placed in one transfer (op by op
    # on the device, each shape's constant compiles a program of its own); the parameters stay
    # where `_init_group` made them unless `pad` has to copy a group.
    for g, (arch, m) in enumerate(spec.groups()):
        mine = [c for c in cells if c.group == g]
        n = len(mine)
        keys = jnp.stack([cell_key(init_key, m, c.seed) for c in mine])
        params = _init_group(keys, d, m, cfg.tied_init)
        if b_dec is not None:
            params = params._replace(b_dec_D=np.broadcast_to(b_dec, (n, d)).copy())
        if arch.has_threshold:
            params = sae.with_threshold(params, np.full((n, m), math.log(cfg.init_threshold), np.float32))
        opt = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(jax.vmap(cfg.adam().init), params))
        groups.append(GroupState(
            params=params,
            opt=opt,  # Adam's initial state: zero count and moments
            l1_coeff=np.asarray([c.coeff for c in mine], np.float32),
            noise=np.asarray([c.noise for c in mine], np.float32),
            lr=np.full((n,), cfg.lr, np.float32),
            since_fired=np.zeros((n, m), np.int32),
            diverged=np.zeros((n,), bool),
            n_resampled=np.zeros((n,), np.int32),
            valid=np.ones((n,), bool),
            pool_x=np.zeros((n, cfg.resample.pool_size, d), np.float32),
            world_index=(np.asarray([spec.world_values.index(c.world_value) for c in mine], np.int32)
                         if spec.world_axis else None),
            arch=arch,
        ))
    state = GridState(tuple(groups), np.zeros((), np.int32), data_key)
    return jax.device_put(pad(state, pad_multiple))


def padded_size(n_cells: int, n_real: int, multiple: int) -> int:
    """A group's cell count on `multiple` devices: the next multiple of `multiple`, and at least
    2 x `multiple` for a group of several real cells. A device then holds one cell of a group only
    where the group has one: XLA compiles a vmapped step of one cell without its cell axis (a
    plain GEMM where several cells make a batched one), which rounds differently, so a cell of
    several on one device of a sharded grid would drift from the same cell on one device."""
    size = -(-n_cells // multiple) * multiple
    return 2 * multiple if multiple > 1 and n_real > 1 and size == multiple else size


def pad(state: GridState, multiple: int) -> GridState:
    """Pads each group with copies of its last cell made inert (lr 0, valid False) up to
    `padded_size` cells (a multiple of `multiple`). Inert cells never show in results. (On the
    host: a padded group's leaves come back as NumPy arrays.)"""
    def one(g: GroupState) -> GroupState:
        n = g.valid.shape[0]
        n_pad = padded_size(n, int(np.count_nonzero(np.asarray(g.valid))), multiple) - n
        if not n_pad:
            return g
        g = jax.device_get(g)
        g = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], n_pad, axis=0)]), g)
        inert = np.arange(g.valid.shape[0]) >= g.valid.shape[0] - n_pad
        return g.replace(lr=np.where(inert, np.float32(0.0), g.lr).astype(g.lr.dtype), valid=g.valid & ~inert)
    return state.replace(groups=tuple(one(g) for g in state.groups))


def unpad(state: GridState, spec: GridSpec) -> GridState:
    """The state without inert padding cells (what checkpoints hold, so that a run can resume
    on a different number of devices)."""
    counts = [sum(1 for c in spec.cells() if c.group == g) for g in range(len(spec.groups()))]
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


def _sq_norm(tree: Any) -> Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def cell_update(cell: GroupState, x_BxD: Array, eps_BxD: Array | None, lr_mult: Array, l1_mult: Array,
                cfg: TrainConfig, step: Array,
                opts: archs.ArchOptions | None = None) -> tuple[GroupState, tuple[Array, Array]]:
    """One Adam step of one cell (unbatched leaves) on input x + noise * eps, target x, with the
    gradient of its architecture's loss (`archs.loss`; `sae.loss` for the report's SAE) by
    autodiff; then its record's `track_threshold` (BatchTopK's moves towards the batch's
    smallest kept activation). opts: the architectures' options (default `cfg.arch_options`)."""
    return cell_step(cell, cell_grads(cell, x_BxD, eps_BxD, l1_mult, cfg, opts), x_BxD, lr_mult, cfg, step)


def cell_grads(cell: GroupState, x_BxD: Array, eps_BxD: Array | None, l1_mult: Array, cfg: TrainConfig,
               opts: archs.ArchOptions | None = None) -> tuple[tuple[Array, tuple[sae.LossAux, Array]], sae.SAEParams]:
    """((L, (aux, the batch statistic a threshold tracks)), dL/dparams) of one cell (`cell_update`)."""
    x_in = x_BxD if eps_BxD is None else x_BxD + cell.noise * eps_BxD
    dead = cell.since_fired >= cfg.dead_window
    return jax.value_and_grad(archs.loss, has_aux=True)(
        cell.params, x_in, cell.l1_coeff * l1_mult, cell.arch, cfg.l1_convention, x_BxD,
        cfg.arch_options if opts is None else opts, dead)


def cell_step(cell: GroupState, loss_grads: Any, x_BxD: Array, lr_mult: Array, cfg: TrainConfig,
              step: Array) -> tuple[GroupState, tuple[Array, Array]]:
    """`cell_update`'s Adam step and threshold from `cell_grads`' output."""
    (total, (aux, stat)), grads = loss_grads
    new, out = apply_grads(cell, grads, total, aux, x_BxD, lr_mult, cfg, step)
    params = cell.arch.record.track_threshold(cell.params, new.params, stat, new.diverged,
                                              cfg.threshold_decay, step)
    return new.replace(params=params), out


def apply_grads(cell: GroupState, grads: sae.SAEParams, total: Array, aux: sae.LossAux,
                x_BxD: Array, lr_mult: Array, cfg: TrainConfig,
                step: Array) -> tuple[GroupState, tuple[Array, Array]]:
    """Adam on one cell's gradients. A non-finite loss or gradient marks the cell diverged; it
    keeps its last finite state. With resampling on, the batch's worst-reconstructed target goes
    to pool row step mod K."""
    lr = cell.lr * lr_mult
    if cfg.full_finite_check:  # every gradient and updated parameter element (two native passes
        # per parameter on the CPU: sae_jax.adam)
        params, opt, diverged = adam.step(cell.params, grads, cell.opt, lr, jnp.isfinite(total),
                                          cell.diverged, cfg.b1, cfg.b2, cfg.eps)
    else:  # one fused reduction; the squared norm overflows before Adam's bounded step could
        updates, opt = cfg.adam().update(grads, cell.opt)
        params = jax.tree.map(lambda p, u: p - lr * u, cell.params, updates)
        diverged = cell.diverged | ~(jnp.isfinite(total) & jnp.isfinite(_sq_norm(grads)))
    keep = lambda new, old: jnp.where(diverged, old, new)
    if not cfg.full_finite_check:
        params, opt = jax.tree.map(keep, params, cell.params), jax.tree.map(keep, opt, cell.opt)
    new = cell.replace(
        params=params,
        opt=opt,
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
    """One Adam step of every cell of a group. With `cfg.fused_step` (always in bfloat16) the
    gradients of a group whose record has `fused_step` (relu_l1's) come from
    `fused.group_loss_and_grad`; otherwise from autodiff, cell by cell under vmap, in the AuxK
    form exact for the group's dead latents (`Architecture.aux_forms`; picked outside the vmap,
    so only that form runs). A world axis's x is (V, B, d): each cell trains on its value's."""
    if group.world_index is not None:
        x_BxD = x_BxD[group.world_index]  # (C, B, d)
    per_cell = 0 if x_BxD.ndim == 3 else None
    if not (cfg.uses_fused_step and group.arch.record.fused_step):
        forms = group.arch.record.aux_forms(cfg.arch_options, *group.params.W_enc_MxD.shape[-2:])
        grads = lambda opts: jax.vmap(functools.partial(cell_grads, opts=opts), in_axes=(
            0, per_cell, None, None, None))(group, x_BxD, eps_BxD, l1_mult, cfg)
        n_dead = jnp.max(jnp.where(group.valid, jnp.sum(group.since_fired >= cfg.dead_window, axis=-1), 0))
        form = sum((n_dead > n).astype(jnp.int32) for n, _ in forms[:-1])
        # only the gradients in the switch: Adam's in-place update of a branch's operands would be copies
        loss_grads = jax.lax.switch(form, [functools.partial(grads, o) for _, o in forms])
        return jax.vmap(cell_step, in_axes=(0, 0, per_cell, None, None, None))(
            group, loss_grads, x_BxD, lr_mult, cfg, step)
    x_in = x_BxD if eps_BxD is None else x_BxD + group.noise[:, None, None] * eps_BxD
    (total, aux), grads = fused.group_loss_and_grad(
        group.params, x_in, group.l1_coeff * l1_mult, cfg.l1_convention, x_BxD, cfg.compute_dtype)
    return jax.vmap(apply_grads, in_axes=(0, 0, 0, 0, per_cell, None, None, None))(
        group, grads, total, aux, x_BxD, lr_mult, cfg, step)


def _local_update(group: GroupState, x_BxD: Array, eps_BxD: Array | None, lr_mult: Array,
                  l1_mult: Array, cfg: TrainConfig, step: Array,
                  mesh: jax.sharding.Mesh | None) -> tuple[GroupState, tuple[Array, Array]]:
    """`group_update`, on each device's own cells where the group is sharded over `mesh`'s 'grid'
    axis: XLA's partitioner does not split a vmapped top_k over the cell axis (it all-gathers the
    group's pre-activations), nor the native kernels' custom calls (the optimizer step's on the
    CPU: `sae_jax.adam`), though the cells are independent."""
    if mesh is None or mesh.size == 1:
        return group_update(group, x_BxD, eps_BxD, lr_mult, l1_mult, cfg, step)
    cells, rep = jax.sharding.PartitionSpec("grid"), jax.sharding.PartitionSpec()
    f = lambda g, x, eps, a, b, t: group_update(g, x, eps, a, b, cfg, t)
    return jax.shard_map(f, mesh=mesh, in_specs=(cells, rep, rep, rep, rep, rep),
                         out_specs=(cells, cells), check_vma=False)(
        group, x_BxD, eps_BxD, lr_mult, l1_mult, step)


def train_step(state: GridState, x_BxD: Array, cfg: TrainConfig, eps_BxD: Array | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[GridState, StepMetrics]:
    """Updates every cell of every group on one shared batch (eps: shared input noise); `mesh`:
    the device mesh the groups are sharded over, if any."""
    lr_mult, l1_mult = _schedules(state.step, cfg)
    outs = [_local_update(g, x_BxD, eps_BxD, lr_mult, l1_mult, cfg, state.step, mesh) for g in state.groups]
    groups = tuple(o[0] for o in outs)
    metrics = StepMetrics(tuple(o[1][0] for o in outs), tuple(o[1][1] for o in outs))
    return state.replace(groups=groups, step=state.step + 1), metrics


World = toy.ToyWorld | tuple[toy.ToyWorld, ...] | synth_world.SynthWorld  # what the scan samples


def sample_inputs(key: Array, world: World, n: int) -> Array:
    """The inputs x (n, d) of a toy world (`toy.sample_inputs`; (V, n, d) for a world axis's
    worlds) or of a SynthSAEBench world (`synth_world.sample`'s x)."""
    if isinstance(world, synth_world.SynthWorld):
        return synth_world.sample(key, world, n)[0]
    return toy.sample_inputs(key, world, n)


def toy_batch(world: World, key: Array, batch_size: int, denoise: bool = False) -> tuple[Array, Array | None]:
    """(x, eps): a batch of the world ((V, B, d) for a world axis's toy worlds) and, when
    denoising, standard normal noise of the same shape."""
    k_x, k_n = jax.random.split(key)
    x = sample_inputs(k_x, world, batch_size)
    return x, (jax.random.normal(k_n, x.shape) if denoise else None)


def _chunk_metrics(metrics: StepMetrics) -> StepMetrics:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), metrics)


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "mesh"))
def run_toy_chunk(state: GridState, world: World, cfg: TrainConfig, n_steps: int,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[GridState, StepMetrics]:
    """n_steps grid steps with the world's sampler (toy or SynthSAEBench) fused in (one compiled
    lax.scan; the world is a traced argument)."""
    def body(s, _):
        key = jax.random.fold_in(s.data_key, s.step)
        x, eps = toy_batch(world, key, cfg.batch_size, cfg.denoise)
        s, m = train_step(s, x, cfg, eps, mesh)
        return resample.maybe_resample(s, cfg.resample, mesh), m
    state, metrics = jax.lax.scan(body, state, None, length=n_steps)
    return state, _chunk_metrics(metrics)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def run_batches_chunk(state: GridState, xs_TxBxD: Array, cfg: TrainConfig,
                      mesh: jax.sharding.Mesh | None = None) -> tuple[GridState, StepMetrics]:
    """One grid step per given batch (e.g. streamed from an activation store), one lax.scan.
    The resampling pool fills from the same stream, exactly as with the toy sampler."""
    def body(s, x):
        s, m = train_step(s, x, cfg, mesh=mesh)
        return resample.maybe_resample(s, cfg.resample, mesh), m
    state, metrics = jax.lax.scan(body, state, xs_TxBxD)
    return state, _chunk_metrics(metrics)


def mesh_of(state: GridState) -> jax.sharding.Mesh | None:
    """The mesh the groups are sharded over (`sharding.shard_state`), or None on one device."""
    s = getattr(state.groups[0].valid, "sharding", None)
    mesh = getattr(s, "mesh", None)
    return mesh if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1 else None


@jax.jit
def _mean_loss(losses: tuple[Array, ...], valid: tuple[Array, ...]) -> Array:
    """Mean loss over real, non-NaN cells: one replicated scalar, fetchable on any process."""
    loss, ok = jnp.concatenate(losses), jnp.concatenate(valid) & ~jnp.isnan(jnp.concatenate(losses))
    return jnp.sum(jnp.where(ok, loss, 0.0)) / jnp.sum(ok)


def train(state: GridState, cfg: TrainConfig, n_steps: int, *,
          world: World | None = None,
          batches: Callable[[int, int], np.ndarray] | None = None, chunk: int = 250,
          callback: Callable[[GridState, StepMetrics], None] | None = None,
          progress: bool = True) -> GridState:
    """Trains until state.step == n_steps, in jitted chunks of `chunk` steps.

    Data come from the toy or SynthSAEBench `world` (sampled on device) or from `batches(start_step, T)`, which
    returns a (T, B, d) array of the batches for steps start_step .. start_step+T-1. After each
    chunk `callback(state, chunk_metrics)` runs on the host (checkpoints, recovery tracking).
    """
    if (world is None) == (batches is None) or n_steps < 1:
        raise UsageError(f"train() needs exactly one of world= or batches=, and `steps` >= 1 (got "
                         f"{n_steps})", field="steps")
    from tqdm.auto import tqdm
    start = int(state.step)
    bar = tqdm(total=n_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    mesh = mesh_of(state)
    while int(state.step) < n_steps:
        t0 = int(state.step)
        n = min(chunk, n_steps - t0)
        if world is not None:
            state, metrics = run_toy_chunk(state, world, cfg, n, mesh)
        else:
            state, metrics = run_batches_chunk(state, jnp.asarray(batches(t0, n)), cfg, mesh)
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
