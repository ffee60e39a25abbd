"""One training run of a grid, end to end: init or resume, train with checkpoints and recovery
tracking, evaluate, and write results.json, dictionaries.npz, figures and REPORT.md.

Used by `sae-jax toy`, `sae-jax grid` and the experiment scripts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Callable

import jax
import numpy as np

from sae_jax import grid, results
from sae_jax.errors import UsageError

log = logging.getLogger(__name__)

RECOVERY_THRESHOLDS = (0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is driven (none of this changes its numbers, except seed and steps)."""

    out: str
    steps: int
    seed: int = 0
    checkpoint_every: int = 1000  # 0: no checkpoints
    keep_checkpoints: int = 3
    resume: bool = False
    check_every: int = 250  # recovery checks against ground truth (0: off)
    eval_samples: int = 8192
    progress: bool = True
    devices: int | None = None
    phase: str = "grid"  # checkpoint sub-directory, for runs with several grids

    def validate(self) -> "RunOptions":
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        for name in ("checkpoint_every", "check_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
        if self.keep_checkpoints < 1:
            raise UsageError("--keep-checkpoints must be >= 1")
        if self.eval_samples < 2:
            raise UsageError("--eval-samples must be >= 2")
        check_writable(self.out)
        return self


def check_writable(out: str) -> None:
    """Creates `out` if needed; raises UsageError when it cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable")


PROGRESS_EVERY = 100  # steps between progress-bar updates (chunk boundaries)


def _chunk(opts: RunOptions) -> int:
    """Steps per jitted scan: divides every period, so chunk ends fall on checkpoint and check
    steps (the results do not depend on it)."""
    periods = [p for p in (opts.checkpoint_every, opts.check_every, PROGRESS_EVERY) if p]
    return max(1, min(math.gcd(*periods), opts.steps))


class _Recovery:
    """First step (and wall seconds since the run began) at which each cell's MMCS with the
    ground truth reached each threshold, checked every `check_every` steps."""

    def __init__(self, n_cells: int, t0: float, saved: dict | None = None):
        self.t0 = t0
        self.first = saved or {str(t): {"steps": [None] * n_cells, "seconds": [None] * n_cells}
                               for t in RECOVERY_THRESHOLDS}

    def update(self, state: grid.GridState, ground_truth: jax.Array) -> None:
        mm = results.grid_mmcs(state, ground_truth)
        step, secs = int(state.step), round(time.perf_counter() - self.t0, 2)
        for t in RECOVERY_THRESHOLDS:
            rec = self.first[str(t)]
            for i, v in enumerate(mm):
                if rec["steps"][i] is None and v >= t:
                    rec["steps"][i], rec["seconds"][i] = step, secs

    def annotate(self, cells: list[dict]) -> None:
        for t in RECOVERY_THRESHOLDS:
            rec = self.first[str(t)]
            for c in cells:
                c[f"steps_to_{t}"] = rec["steps"][c["index"]]
                c[f"seconds_to_{t}"] = rec["seconds"][c["index"]]


def train_grid(spec: grid.GridSpec, cfg: grid.TrainConfig, opts: RunOptions, d: int,
               run_config: dict, *, world=None, batches: Callable | None = None,
               ground_truth: jax.Array | None = None) -> tuple[grid.GridState, dict]:
    """Initialises (or resumes) and trains the grid; returns (state, extra results).

    Checkpoints hold the whole state plus the run configuration and the recovery record;
    a resume with different arguments is refused, naming the arguments that differ."""
    from sae_jax import checkpoint, sharding

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(opts.devices)
    state = grid.init_grid(jax.random.PRNGKey(opts.seed), spec, d, cfg)  # unpadded
    ckpt = None
    saved_recovery = None
    if opts.checkpoint_every or opts.resume:
        ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(opts.out), "checkpoints", opts.phase),
                                       max_to_keep=opts.keep_checkpoints)
    if opts.resume:
        if ckpt.latest_step() is None:
            raise UsageError(f"--resume: no complete checkpoint under {ckpt.directory}")
        saved = ckpt.read_metadata().get("run_config", {})  # no arrays read yet
        diffs = checkpoint.metadata_mismatches(saved, run_config)
        if diffs:
            raise UsageError("--resume with different arguments: " + "; ".join(diffs[:3]))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        state, meta, step = ckpt.restore(abstract)
        saved_recovery = meta.get("recovery")
        log.info("resumed from step %d", step)
    state = sharding.shard_state(grid.pad(state, mesh.devices.size), mesh)
    if int(state.step) > opts.steps:
        raise UsageError(f"--resume: the checkpoint is at step {int(state.step)}, past --steps {opts.steps}")
    recovery = _Recovery(len(spec.cells()), t0, saved_recovery) if ground_truth is not None else None

    def callback(s: grid.GridState, _metrics) -> None:
        step = int(s.step)
        if recovery is not None and opts.check_every and (step % opts.check_every == 0 or step == opts.steps):
            recovery.update(s, ground_truth)
        if ckpt is not None and opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == opts.steps):
            ckpt.save(step, grid.unpad(s, spec), {"run_config": run_config,
                                "recovery": recovery.first if recovery else None})

    try:
        state = grid.train(state, cfg, opts.steps, world=world, batches=batches, chunk=_chunk(opts),
                           callback=callback, progress=opts.progress)
    finally:
        if ckpt is not None:
            ckpt.close()
    extra = {"train_seconds": round(time.perf_counter() - t0, 2)}
    if recovery is not None:
        extra["recovery"] = recovery
    return state, extra


def finish(state: grid.GridState, spec: grid.GridSpec, cfg: grid.TrainConfig, x_eval: jax.Array,
           ground_truth: jax.Array | None, extra: dict) -> tuple[list[dict], list[np.ndarray], dict]:
    """Evaluates every cell and runs the grid diagnostics and the selection."""
    from sae_jax import sharding

    state = sharding.gather_to_host(state)
    cells = results.evaluate(state, spec, cfg, x_eval, ground_truth)
    if "recovery" in extra:
        extra.pop("recovery").annotate(cells)
    dicts = results.dictionaries(state, spec)
    return cells, dicts, results.analyse(cells, dicts)


def eval_batch_toy(world, seed: int, n: int) -> jax.Array:
    """A held-out evaluation batch, from a key no training step uses."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x0E7A1)
    return grid.toy_batch(world, key, n)[0]


def to_jsonable(obj) -> dict:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
