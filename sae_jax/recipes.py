"""Presets and training recipes, as data, and the one function that turns them into a
`grid.TrainConfig`.

A new training knob is a field of `config.TrainConfig` (or of `resample.ResampleConfig`) made with
`knobs.knob` (the CLI's flag comes from it), and its value in the recipes below that use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sae_jax import grid, resample


def quarter_decades(j_lo: int, j_hi: int) -> tuple[float, ...]:
    """The replication's alpha grid: 10^(j/4) for j = j_lo .. j_hi, to 4 significant digits."""
    return tuple(float(f"{10 ** (j / 4):.4g}") for j in range(j_lo, j_hi + 1))


@dataclasses.dataclass(frozen=True)
class ToyPreset:
    """A toy world, its grid, the steps, and the denoising appendix grid."""

    d: int
    features: int
    mean_active: float
    decay: float
    l1_coeff: tuple[float, ...]
    ratios: tuple[float, ...]
    seeds: int
    steps: int
    batch_size: int
    denoise_noise: tuple[float, ...]
    denoise_steps: int
    # Added to the report's recipe when no recipe is named (None: nothing added).
    report_recipe_extras: Mapping[str, Any] | None = None


PRESETS: dict[str, ToyPreset] = {
    # The report's world shrunk 4x in d and h, keeping its sparsity per dimension roughly
    # (k/d = 3/64 against 5/256), with the report's method and alpha grid; ~6 min on 2 CPU cores.
    # With no recipe named it adds a linear L1 warm-up over the first 1,000 steps: without it one
    # latent at ratio 1 dies early and the report's recipe ends at MMCS 0.9896 instead of >= 0.99.
    "small": ToyPreset(d=64, features=128, mean_active=3.0, decay=0.99, l1_coeff=quarter_decades(-8, 4),
                       ratios=(0.25, 0.5, 1.0, 2.0, 4.0), seeds=1, steps=5000, batch_size=256,
                       denoise_noise=(0.0, 0.02, 0.05, 0.1, 0.2), denoise_steps=3000,
                       report_recipe_extras={"l1_warmup": 1000}),
    # The report's sizes and grids, for a GPU.
    "paper": ToyPreset(d=256, features=512, mean_active=5.0, decay=0.99, l1_coeff=quarter_decades(-8, 4),
                       ratios=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), seeds=1, steps=20000, batch_size=256,
                       denoise_noise=(0.0, 0.01, 0.03, 0.1, 0.3), denoise_steps=20000),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training values by field name (TrainConfig's, and ResampleConfig's under their
    `resample.FIELDS` names such as `resample_every`), and fields set to a fraction of the
    run's steps (`of_steps`: field -> fraction)."""

    values: Mapping[str, Any]
    of_steps: Mapping[str, float] = dataclasses.field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # The report's: Adam 1e-3, no resampling.
    "report": Recipe(dict(lr=1e-3, b1=0.9, b2=0.999)),
    # The fast one: cosine decay over the run, tied init, resampling until 75% of the steps.
    "fast": Recipe(dict(lr=5e-3, b1=0.9, b2=0.99, batch_size=64, tied_init=True, full_finite_check=False,
                        resample_every=100, resample_worst=16, resample_dead_window=500,
                        dedup_threshold=0.9, resample_encoder_scale=0.2),
                   of_steps={"resample_until": 0.75, "lr_decay_steps": 1.0}),
    # SynthSAEBench's training (Adam 3e-4, batch 1024) with a decoder bias started at the data's
    # mean (its worlds have a bias of norm ~0.5); TopK and BatchTopK keep AuxK (1/32) for dead
    # latents, as everywhere without resampling.
    "synth": Recipe(dict(lr=3e-4, b1=0.9, b2=0.999, batch_size=1024, decoder_bias="mean")),
}


# Added to any recipe for runs on stored activations (`sae-jax grid`) unless a flag sets them:
# real activations have a large mean, which a decoder bias takes instead of the latents.
STORED_ACTIVATIONS: Mapping[str, Any] = {"decoder_bias": "mean"}


def train_config(recipe: str | None, steps: int, overrides: Mapping[str, Any] | None = None,
                 preset: ToyPreset | None = None) -> grid.TrainConfig:
    """The recipe's values (default: the report's), under the preset's batch size, plus the
    preset's additions when no recipe is named, then `overrides` (field names as in `Recipe`;
    None values are ignored). Fields the recipe gives as fractions of the run are set from
    `steps` unless overridden."""
    r = RECIPES[recipe or "report"]
    values = {"batch_size": preset.batch_size if preset else 256, **r.values}
    if recipe is None and preset is not None:
        values.update(preset.report_recipe_extras or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for field in derived_from_steps(recipe, overrides):
        values[field] = int(r.of_steps[field] * steps)
    rs = {resample.FIELDS[k]: values.pop(k) for k in list(values) if k in resample.FIELDS}
    return grid.TrainConfig(**values, resample=resample.ResampleConfig(**rs)).validate()


def derived_from_steps(recipe: str | None, overrides: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The fields `train_config` sets from the step count (a recipe's fractions not overridden)."""
    given = {k for k, v in (overrides or {}).items() if v is not None}
    return tuple(f for f, frac in RECIPES[recipe or "report"].of_steps.items() if frac and f not in given)
