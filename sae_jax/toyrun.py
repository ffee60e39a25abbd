"""The toy reproduction: presets, recipes, and the run behind `sae-jax toy`.

A run trains the main (alpha x ratio x seed) grid on a toy world, then (optionally) the
denoising appendix grid (input-noise std x alpha at ratio 1, no correlation, no decay), and
writes DIR/results.json, DIR/dictionaries.npz, DIR/figures/*.png and DIR/REPORT.md.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from sae_jax import grid, plots, report, results, runner, toy

# alpha = 10^(j/4): the replication's grid.
def quarter_decades(j_lo: int, j_hi: int) -> tuple[float, ...]:
    return tuple(float(f"{10 ** (j / 4):.4g}") for j in range(j_lo, j_hi + 1))


PRESETS: dict[str, dict] = {
    # The report's world shrunk 4x in d and h, keeping its sparsity per dimension roughly
    # (k/d = 3/64 against 5/256), with the report's method and alpha grid; ~6 min on 2 CPU cores.
    # With --recipe unset it adds a linear L1 warm-up over the first 1,000 steps: without it one
    # latent at ratio 1 dies early and the report's recipe ends at MMCS 0.9896 instead of >= 0.99.
    "small": dict(d=64, features=128, mean_active=3.0, decay=0.99, l1=quarter_decades(-8, 4),
                  ratios=(0.25, 0.5, 1.0, 2.0, 4.0), seeds=1, steps=5000, batch_size=256,
                  report_recipe_extras=dict(l1_warmup=1000),
                  denoise_noise=(0.0, 0.02, 0.05, 0.1, 0.2), denoise_steps=3000),
    # The report's sizes and grids, for a GPU.
    "paper": dict(d=256, features=512, mean_active=5.0, decay=0.99, l1=quarter_decades(-8, 4),
                  ratios=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), seeds=1, steps=20000, batch_size=256,
                  denoise_noise=(0.0, 0.01, 0.03, 0.1, 0.3), denoise_steps=20000),
}

# Training recipes: the report's (Adam 1e-3, no resampling) and the fast one of issue #7.
RECIPES: dict[str, dict] = {
    "report": dict(lr=1e-3, b1=0.9, b2=0.999),
    "fast": dict(lr=5e-3, b1=0.9, b2=0.99, batch_size=64, tied_init=True, resample_every=100,
                 resample_worst=16, resample_dead_window=500, dedup_threshold=0.9,
                 resample_encoder_scale=0.2, resample_until_frac=0.75, lr_decay_frac=1.0,
                 full_finite_check=False),
}


@dataclasses.dataclass(frozen=True)
class ToyRun:
    world: toy.ToyConfig
    spec: grid.GridSpec
    train: grid.TrainConfig
    opts: runner.RunOptions
    denoise_noise: tuple[float, ...] = ()
    denoise_steps: int = 0

    def config(self) -> dict:
        """Everything that determines the numbers (what a resume must match)."""
        return {"kind": "toy", "world": dataclasses.asdict(self.world), "grid": runner.to_jsonable(self.spec),
                "train": dataclasses.asdict(self.train), "steps": self.opts.steps, "seed": self.opts.seed,
                "eval_samples": self.opts.eval_samples, "denoise_noise": list(self.denoise_noise),
                "denoise_steps": self.denoise_steps}


def run(r: ToyRun, figures: bool = True) -> dict:
    """Trains, evaluates and writes everything; returns the results dict."""
    r.opts.validate()
    world_key = jax.random.fold_in(jax.random.PRNGKey(r.opts.seed), 0x3017D)
    world = toy.make_world(world_key, r.world)
    cfg = r.config()
    state, extra = runner.train_grid(r.spec, r.train, r.opts, r.world.d, cfg, world=world,
                                     ground_truth=world.features_HxD)
    x_eval = runner.eval_batch_toy(world, r.opts.seed, r.opts.eval_samples)
    cells, dicts, analysis = runner.finish(state, r.spec, r.train, x_eval, world.features_HxD, extra)
    if r.denoise_noise:
        extra["denoising"] = _denoising(r, cfg)
    out = results.write(r.opts.out, cfg, cells, analysis, dicts, np.asarray(world.features_HxD), extra)
    from sae_jax import export
    export.write_weights(r.opts.out, state, r.spec, x_eval)  # weights.safetensors: every cell's full weights
    if figures:
        figs = plots.toy_figures(out, os.path.join(r.opts.out, "figures"))
        report.write(r.opts.out, out, figs, "sae-jax toy reproduction")
    return out


def _denoising(r: ToyRun, cfg: dict) -> dict:
    """The appendix: noise std x alpha at dictionary size h, no correlation, no decay."""
    wcfg = dataclasses.replace(r.world, correlated=False, decay=1.0)
    world = toy.make_world(jax.random.fold_in(jax.random.PRNGKey(r.opts.seed), 0xD0153), wcfg)
    spec = grid.GridSpec.from_ratios(r.spec.l1, (1.0,), wcfg.features, 1, r.denoise_noise)
    tcfg = dataclasses.replace(r.train, denoise=True)
    opts = dataclasses.replace(r.opts, steps=r.denoise_steps, phase="denoising")
    state, extra = runner.train_grid(spec, tcfg, opts, wcfg.d, cfg, world=world,
                                     ground_truth=world.features_HxD)
    x_eval = runner.eval_batch_toy(world, r.opts.seed, r.opts.eval_samples)
    cells, _, _ = runner.finish(state, spec, tcfg, x_eval, world.features_HxD, extra)
    return {"world": dataclasses.asdict(wcfg), "cells": cells}
