"""One run of a grid, end to end, for a toy world or stored activations: init or resume, train
with checkpoints and recovery tracking, evaluate, and write results.json, dictionaries.npz,
figures and REPORT.md.

`run(spec, train, opts, data)` is what `sae-jax toy` and `sae-jax grid` call; `data` is a
`ToyData` (a toy world, sampled on device, plus the optional denoising appendix grid) or a
`StoreData` (an activation store streamed in a fixed order, so a resume sees the same batches).
On several processes (`jax.distributed`) every process runs the same call; process 0 alone
writes checkpoints and outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from sae_jax import checkpoint, config, export, grid, report, results, sharding, toy
from sae_jax.errors import UsageError
from sae_jax.knobs import RUN, fixed, knob

log = logging.getLogger(__name__)

RECOVERY_THRESHOLDS = (0.95, 0.99)
PROGRESS_EVERY = 100  # steps between progress-bar updates (chunk boundaries)
GROWABLE = ("steps", "denoise_steps")  # run_config keys an extended run (--resume) may raise


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is driven (none of this changes its numbers, except seed and steps)."""

    out: str = knob(None, "output directory", group=RUN)
    steps: int = knob(None, "training steps", parse=int)
    seed: int = knob(0, "master PRNG seed", parse=int, cli_default=0)
    checkpoint_every: int = knob(1000, "0 turns checkpoints off", group=RUN, parse=int, cli_default=1000)
    keep_checkpoints: int = knob(3, "checkpoints kept", group=RUN, parse=int, cli_default=3)
    resume: bool = knob(False, "continue from the newest complete checkpoint (a larger --steps extends the "
                               "run)", group=RUN, boolean="switch", cli_default=False)
    check_every: int = knob(250, "MMCS recovery checks against the ground truth (toy; 0: off)", group=RUN,
                            parse=int, cli_default=250)
    eval_samples: int = knob(8192, "evaluation samples", group=RUN, parse=int, cli_default=8192)
    progress: bool = knob(True, "no progress bar", group=RUN, flag="--no-progress", boolean="switch")
    devices: int | None = knob(None, "use the first N devices (default: all)", group=RUN, parse=int)
    figures: bool = knob(True, "no figures", group=RUN, flag="--no-figures", boolean="switch")
    phase: str = fixed("grid", "checkpoint sub-directory, for runs with several grids")
    # TrainConfig fields a recipe derived from `steps`: a run extended with `resume` to more
    # steps is refused while any is set, as it would no longer fit the new step count.
    derived_from_steps: tuple[str, ...] = fixed((), "set from the recipe")

    def validate(self) -> "RunOptions":
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"`steps` must be >= 1, got {self.steps}", field="steps")
        for name in ("checkpoint_every", "check_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"`{name}` must be >= 0", field=name)
        if self.keep_checkpoints < 1:
            raise UsageError("`keep_checkpoints` must be >= 1", field="keep_checkpoints")
        if self.eval_samples < 2:
            raise UsageError("`eval_samples` must be >= 2", field="eval_samples")
        check_writable(self.out)
        return self


def check_writable(out: str, field: str = "out") -> Path:
    """Creates `out` if needed; raises UsageError when a file cannot be written in it."""
    d = Path(out).expanduser().absolute()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"`{field}` {out} is not writable: {e.strerror}", field=field) from None
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UsageError(f"`{field}` {out} is not writable: {e.strerror}", field=field) from None
    return d


# ----------------------------------------------------------------------------- data sources
@dataclasses.dataclass(frozen=True)
class ToyData:
    """A toy world; `denoise_noise` non-empty adds the appendix grid (noise std x alpha at
    dictionary size h, no correlation, no decay) trained for `denoise_steps`."""

    world: toy.ToyConfig
    denoise_noise: tuple[float, ...] = ()
    denoise_steps: int = 0


@dataclasses.dataclass(frozen=True)
class StoreData:
    """Stored activations (`activations.ActivationStore`), streamed `buffer_rows` at a time."""

    path: str
    store: object
    buffer_rows: int = 131072

    tensor: str | None = None  # the tensor of a .safetensors file with several

    @classmethod
    def open(cls, path: str, buffer_rows: int = 131072, tensor: str | None = None) -> "StoreData":
        """Anything `activations.open_activations` reads: a store, an (n, d) or (batch, tokens, d)
        .npy, a directory of .npy shards, a .safetensors tensor (float16, bfloat16 or float32)."""
        from sae_jax import activations

        try:
            return cls(path, activations.open_activations(path, tensor), buffer_rows, tensor)
        except ValueError as e:
            raise UsageError(f"`activations` {path}: {str(e).splitlines()[0]}", field="activations") from None


class _Batches:
    """batches(start_step, T) -> (T, B, d) float32, step k being stream batch k."""

    def __init__(self, store, batch_size: int, seed: int, buffer_rows: int):
        self.store, self.batch_size, self.seed, self.buffer_rows = store, batch_size, seed, buffer_rows
        self.next_step, self.it = None, None

    def __call__(self, start: int, n: int) -> np.ndarray:
        if self.it is None or start != self.next_step:
            self.it = self.store.stream(self.batch_size, self.seed, self.buffer_rows, start_batch=start)
        try:
            out = np.stack([next(self.it) for _ in range(n)])
        except ValueError as e:  # NaN/Inf found while streaming
            raise UsageError(f"`activations`: {str(e).splitlines()[0]}", field="activations") from None
        self.next_step = start + n
        return out


def eval_batch_toy(world: toy.ToyWorld, seed: int, n: int) -> jax.Array:
    """A held-out evaluation batch, from a key no training step uses."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x0E7A1)
    return grid.toy_batch(world, key, n)[0]


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class Recovery:
    """First step (and wall seconds since the run began) at which each cell's MMCS with the
    ground truth reached each threshold (threshold -> per-cell lists; None: not yet)."""

    steps: dict[str, list[int | None]]
    seconds: dict[str, list[float | None]]

    @classmethod
    def empty(cls, n_cells: int) -> "Recovery":
        return cls({str(t): [None] * n_cells for t in RECOVERY_THRESHOLDS},
                   {str(t): [None] * n_cells for t in RECOVERY_THRESHOLDS})

    @classmethod
    def from_json(cls, saved: dict) -> "Recovery":
        return cls({t: v["steps"] for t, v in saved.items()}, {t: v["seconds"] for t, v in saved.items()})

    def to_json(self) -> dict:
        return {t: {"steps": self.steps[t], "seconds": self.seconds[t]} for t in self.steps}

    def update(self, state: grid.GridState, ground_truth: jax.Array, seconds: float) -> None:
        mm = results.grid_mmcs(state, ground_truth)
        step = int(state.step)
        for t in self.steps:
            for i, v in enumerate(mm):
                if self.steps[t][i] is None and v >= float(t):
                    self.steps[t][i], self.seconds[t][i] = step, round(seconds, 2)

    def annotate(self, cells: list[dict]) -> None:
        for t in self.steps:
            for c in cells:
                c[f"steps_to_{t}"] = self.steps[t][c["index"]]
                c[f"seconds_to_{t}"] = self.seconds[t][c["index"]]


@dataclasses.dataclass(frozen=True)
class Trained:
    """What training returns beside the state."""

    seconds: float
    recovery: Recovery | None


def _chunk(opts: RunOptions) -> int:
    """Steps per jitted scan: divides every period, so chunk ends fall on checkpoint and check
    steps (the results do not depend on it)."""
    periods = [p for p in (opts.checkpoint_every, opts.check_every, PROGRESS_EVERY) if p]
    return max(1, min(math.gcd(*periods), opts.steps))


def _check_extension(cfg: grid.TrainConfig, opts: RunOptions, first_steps: int) -> None:
    """A run extended past the checkpointed run's steps keeps that run's schedules; refused when
    a schedule was derived from its step count, or when the cosine decay ends too early."""
    if opts.steps <= first_steps:
        return
    why = f"`resume` to {opts.steps} steps extends a run of {first_steps} steps, but"
    if opts.derived_from_steps:
        names = " and ".join(f"`{n}`" for n in opts.derived_from_steps)
        raise UsageError(f"{why} the recipe set {names} from its step count; set them explicitly "
                         "in both runs to extend it", field=opts.derived_from_steps[0])
    if 0 < cfg.lr_decay_steps < opts.steps:
        raise UsageError(f"{why} the learning rate's cosine decay (`lr_decay_steps`) ends at step "
                         f"{cfg.lr_decay_steps}", field="lr_decay_steps")


def checkpointed_train_value(out: str, field: str, phase: str = "grid") -> Any:
    """A training field's value in the newest checkpoint of run OUT (its default when the
    checkpoint predates the field: `TrainConfig.to_dict` omits defaults), or None without one."""
    train = checkpoint.latest_run_config(os.path.join(os.path.abspath(out), "checkpoints", phase))
    return None if train is None else train.get("train", {}).get(field, getattr(grid.TrainConfig, field))


def _bias_inputs(world: Any, seed: int, n: int) -> jax.Array:
    """n inputs of the world from a key no training step uses (b_dec's starting sample)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xB1A5)
    return jax.jit(grid.sample_inputs, static_argnums=2)(key, world, n)


def train_grid(spec: grid.GridSpec, cfg: grid.TrainConfig, opts: RunOptions, d: int,
               run_config: dict, *, world: toy.ToyWorld | None = None, batches: Callable | None = None,
               ground_truth: jax.Array | None = None) -> tuple[grid.GridState, Trained]:
    """Initialises (or resumes) and trains the grid.

    Checkpoints hold the whole state, the run configuration and the recovery record. A resume
    with different arguments is refused, naming them; it may raise `steps` (an extended run),
    keeping every schedule as `cfg` and the checkpoint give it."""
    t0 = time.perf_counter()
    from sae_jax import sparse

    sparse.native_in_use()  # without the native kernels on the CPU: their line now, before the bar
    mesh = sharding.make_mesh(opts.devices)
    draw = None if world is None else functools.partial(_bias_inputs, world)
    x_init = config.decoder_bias_sample(cfg, opts.seed, d, draw, batches)
    state = grid.init_grid(jax.random.PRNGKey(opts.seed), spec, d, cfg, x_init=x_init)  # unpadded
    writer = jax.process_index() == 0
    ckpt = None
    if (opts.checkpoint_every and writer) or opts.resume:
        ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(opts.out), "checkpoints", opts.phase),
                                       max_to_keep=opts.keep_checkpoints, process_local=True)
    try:  # the checkpointer is closed on every path, early errors included
        recovery = Recovery.empty(len(spec.cells())) if ground_truth is not None else None
        # A later phase (the denoising grid) that a killed run never reached starts afresh.
        if opts.resume and (opts.phase == "grid" or ckpt.latest_step() is not None):
            state, meta, step = checkpoint.resume(
                ckpt, state, run_config, may_grow=GROWABLE,
                check=lambda m: _check_extension(cfg, opts, m.get("steps", opts.steps)))
            if jax.process_count() > 1:  # host values, placed on the global mesh below
                state = jax.device_get(state)
            if recovery is not None and meta.get("recovery"):
                recovery = Recovery.from_json(meta["recovery"])
            log.info("resumed from step %d", step)
        if int(state.step) > opts.steps:
            raise UsageError(f"`resume`: the checkpoint is at step {int(state.step)}, past `steps` "
                             f"{opts.steps}", field="steps")
        state = sharding.shard_state(grid.pad(state, mesh.devices.size), mesh)
        if jax.process_count() > 1:  # inputs every process holds alike, as global arrays
            world, ground_truth = sharding.replicate((world, ground_truth), mesh)

        def callback(s: grid.GridState, _metrics) -> None:
            step = int(s.step)
            if recovery is not None and opts.check_every and (step % opts.check_every == 0 or step == opts.steps):
                recovery.update(s, ground_truth, time.perf_counter() - t0)
            if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == opts.steps):
                # on several processes: gathered (every process), written by process 0
                unpadded = grid.unpad(s if jax.process_count() == 1 else sharding.to_host(s), spec)
                if writer:
                    ckpt.save(step, unpadded, {"run_config": run_config, "steps": opts.steps,
                                               "recovery": recovery.to_json() if recovery else None})

        state = grid.train(state, cfg, opts.steps, world=world, batches=batches, chunk=_chunk(opts),
                           callback=callback, progress=opts.progress)
    finally:
        if ckpt is not None:
            ckpt.close()
    return state, Trained(round(time.perf_counter() - t0, 2), recovery)


def evaluate(state: grid.GridState, spec: grid.GridSpec, cfg: grid.TrainConfig, x_eval: jax.Array,
             ground_truth: jax.Array | None, trained: Trained) -> tuple[list[dict], list[np.ndarray], dict]:
    """Evaluates every cell and runs the grid diagnostics and the selection (on the host's copy
    of the state, without padding: `results.evaluate`)."""
    state = grid.unpad(sharding.to_host(state), spec)
    cells = results.evaluate(state, spec, cfg, x_eval, ground_truth)
    if trained.recovery is not None:
        trained.recovery.annotate(cells)
    dicts = results.dictionaries(state, spec)
    if spec.world_axis:
        return cells, dicts, _analyse_per_world_value(cells, dicts, spec, cfg)
    return cells, dicts, results.analyse(cells, dicts, cfg.l1_convention)


def _analyse_per_world_value(cells: list[dict], dicts: list[np.ndarray], spec: grid.GridSpec,
                             cfg: grid.TrainConfig) -> dict:
    """A world axis's grid: the diagnostics and the selection for each value's cells alone."""
    per = [{"world_value": v, **results.analyse([c for c in cells if c["world_value"] == v], dicts,
                                                cfg.l1_convention)} for v in spec.world_values]
    return {"suggested": {"ratio": None, "l1": None, "summary": "one per world value: by_world_value"},
            "ground_truth_optimum": None, "by_world_value": per,
            "diverged_cells": [i for p in per for i in p["diverged_cells"]]}


# ----------------------------------------------------------------------------- whole runs
def run(spec: grid.GridSpec, train: grid.TrainConfig, opts: RunOptions, data: ToyData | StoreData,
        compare_toy: str | None = None) -> dict:
    """Trains, evaluates and writes everything; returns the results dict. `compare_toy`: a toy
    run directory whose figures 4, 9 and 10 are shown beside figures 11-13 (stored data)."""
    opts.validate()
    if isinstance(data, ToyData):
        return _run_toy(spec, train, opts, data)
    figs_beside = _toy_side_by_side(compare_toy) if compare_toy and opts.figures else {}
    store = data.store
    config = {"kind": "activations", "activations": os.path.abspath(data.path), "n_rows": int(store.n),
              "d": int(store.d), "grid": spec.to_dict(), "train": train.to_dict(), "steps": opts.steps,
              "seed": opts.seed, "eval_samples": opts.eval_samples, "buffer_rows": data.buffer_rows,
              **({"tensor": data.tensor} if data.tensor else {})}
    batches = _Batches(store, train.batch_size, opts.seed, data.buffer_rows)
    opts = dataclasses.replace(opts, check_every=0)
    state, trained = train_grid(spec, train, opts, store.d, config, batches=batches)
    x_eval = next(store.stream(min(opts.eval_samples, store.n), opts.seed + 1, data.buffer_rows,
                               dtype=np.float32))
    cells, dicts, analysis = evaluate(state, spec, train, x_eval, None, trained)
    out = results.write(opts.out, config, cells, analysis, dicts, None, {"train_seconds": trained.seconds})
    # weights.safetensors: every process joins the gather, process 0 writes
    export.write_weights(opts.out, sharding.gather_to_host(state), spec, x_eval)
    if opts.figures and jax.process_index() == 0:
        from sae_jax import plots  # matplotlib: only when figures are drawn

        figs = plots.lm_figures(out, os.path.join(opts.out, "figures"))
        notes = []
        if figs_beside:
            figs.update(figs_beside)
            notes.append(f"The toy figures 4, 9 and 10 from {compare_toy} are shown beside "
                         "figures 11-13 for comparison, as in the report.")
        report.write(opts.out, out, figs, "sae-jax grid on stored activations", notes)
    return out


def _run_toy(spec: grid.GridSpec, train: grid.TrainConfig, opts: RunOptions, data: ToyData) -> dict:
    config = {"kind": "toy", "world": dataclasses.asdict(data.world), "grid": spec.to_dict(),
              "train": train.to_dict(), "steps": opts.steps, "seed": opts.seed,
              "eval_samples": opts.eval_samples, "denoise_noise": list(data.denoise_noise),
              "denoise_steps": data.denoise_steps}
    world_key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), 0x3017D)
    world = toy.make_world(world_key, data.world)
    worlds = (toy.axis_worlds(world_key, data.world, spec.world_axis, spec.world_values)
              if spec.world_axis else world)  # a world axis: the same features in every world
    state, trained = train_grid(spec, train, opts, data.world.d, config, world=worlds,
                                ground_truth=world.features_HxD)
    x_eval = eval_batch_toy(world, opts.seed, opts.eval_samples)
    cells, dicts, analysis = evaluate(state, spec, train, x_eval, world.features_HxD, trained)
    extra = {"train_seconds": trained.seconds}
    if data.denoise_noise:
        extra["denoising"] = _denoising(spec, train, opts, data, config)
    out = results.write(opts.out, config, cells, analysis, dicts, np.asarray(world.features_HxD), extra)
    # weights.safetensors: every process joins the gather, process 0 writes
    export.write_weights(opts.out, sharding.gather_to_host(state), spec, x_eval)
    if opts.figures and jax.process_index() == 0 and not spec.world_axis:
        from sae_jax import plots  # matplotlib: only when figures are drawn

        figs = plots.toy_figures(out, os.path.join(opts.out, "figures"))
        report.write(opts.out, out, figs, "sae-jax toy reproduction")
    return out


def _denoising(spec: grid.GridSpec, train: grid.TrainConfig, opts: RunOptions, data: ToyData,
               config: dict) -> dict:
    """The appendix: noise std x alpha at dictionary size h, no correlation, no decay (and none
    of the other world knobs: clean, uniform, independent features)."""
    wcfg = dataclasses.replace(data.world, correlated=False, decay=1.0, corr_strength=1.0, zipf=0.0,
                               hierarchy=0, nonneg=False, jitter=0.0, noise=0.0)
    world = toy.make_world(jax.random.fold_in(jax.random.PRNGKey(opts.seed), 0xD0153), wcfg)
    dspec = grid.GridSpec.from_ratios(spec.l1_coeff, (1.0,), wcfg.features, 1, data.denoise_noise)
    tcfg = dataclasses.replace(train, denoise=True)
    dopts = dataclasses.replace(opts, steps=data.denoise_steps, phase="denoising")
    state, trained = train_grid(dspec, tcfg, dopts, wcfg.d, config, world=world,
                                ground_truth=world.features_HxD)
    x_eval = eval_batch_toy(world, opts.seed, opts.eval_samples)
    cells, _, _ = evaluate(state, dspec, tcfg, x_eval, world.features_HxD, trained)
    return {"world": dataclasses.asdict(wcfg), "cells": cells}


def _toy_side_by_side(toy_dir: str) -> dict[str, str]:
    names = ("fig04_dead_latents", "fig09_ssll", "fig10_mmcs_with_larger")
    found = {f"toy_{n}": os.path.join(toy_dir, "figures", f"{n}.png") for n in names}
    missing = [p for p in found.values() if not os.path.exists(p)]
    if missing:
        raise UsageError(f"`compare_toy` {toy_dir}: missing {missing[0]} (run sae-jax toy there first)",
                         field="compare_toy")
    return {k: os.path.abspath(v) for k, v in found.items()}
