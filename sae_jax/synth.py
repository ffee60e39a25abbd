"""SynthSAEBench worlds in JAX: one namespace for the sampler (`sae_jax.synth_world`) and the
models it samples (`sae_jax.synth_models`).

    world = synth.preset("synth-small", seed=42)      # or synth.load_saelens(DIR), synth.from_config(cfg)
    x_NxD, acts_NxF = synth.sample(key, world, n)     # pure and jittable

The semantics reproduced from SAELens, and where the draws differ, are in `sae_jax.synth_world`'s
docstring; loading and the presets in `sae_jax.synth_models`'s.
"""

from sae_jax.synth_models import from_config, load_saelens, preset
from sae_jax.synth_world import (
                                 Level,
                                 SynthWorld,
                                 apply_hierarchy,
                                 feature_acts,
                                 hierarchy_levels,
                                 hierarchy_violations,
                                 make_world,
                                 sample,
)

__all__ = ["Level", "SynthWorld", "apply_hierarchy", "feature_acts", "from_config", "hierarchy_levels",
           "hierarchy_violations", "load_saelens", "make_world", "preset", "sample"]
