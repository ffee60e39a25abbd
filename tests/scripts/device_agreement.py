"""Run under JAX_NUM_CPU_DEVICES=4 by tests/test_sharding.py: the issue's grid (`sae-jax toy --d 32
--features 64 --l1 0.03,0.1,0.3 --ratios 1,2 --steps 800 --batch-size 256 --seed 5`: the report's
recipe) trained on 1 and on 4 devices; prints one JSON line of both runs' parameters."""

import json

import jax
import numpy as np

from sae_jax import grid, recipes, sharding, toy

assert jax.device_count() == 4, jax.devices()
STEPS, SEED = 800, 5
spec = grid.GridSpec.from_ratios((0.03, 0.1, 0.3), (1.0, 2.0), 64, seeds=1)
cfg = recipes.train_config(None, STEPS, {}, recipes.PRESETS["small"])
key = jax.random.PRNGKey(SEED)
world = toy.make_world(jax.random.fold_in(key, 0x3017D), toy.ToyConfig(d=32, features=64, mean_active=3.0))

out = {"params": {}, "padded_cells": {}}
for n in (1, 4):
    mesh = sharding.make_mesh(n)
    state = sharding.shard_state(grid.pad(grid.init_grid(key, spec, 32, cfg), n), mesh)
    out["padded_cells"][n] = [int(g.valid.shape[0]) for g in state.groups]
    state = grid.unpad(jax.device_get(grid.train(state, cfg, STEPS, world=world, progress=False)), spec)
    out["params"][n] = [{k: np.asarray(v).tolist() for k, v in grid.cell_params(state, c)._asdict().items()
                         if v is not None} for c in spec.cells()]
print(json.dumps(out))
