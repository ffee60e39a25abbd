"""Run under JAX_NUM_CPU_DEVICES=8 by tests/test_sharding.py; prints one JSON line of findings."""

import json
import re

import jax
import numpy as np

from sae_jax import grid, resample, results, sharding, toy

assert jax.device_count() == 8, jax.devices()
world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=16, features=32, mean_active=3))
# relu_l1: 3 cells per size group; topk and batchtopk (which select by top-k): 1 cell per group
spec = grid.GridSpec.from_ratios([0.1, 0.3, 1.0], [0.5, 1.0], 32, seeds=1,
                                 archs=("relu_l1", "topk", "batchtopk"), k=(2,))
cfg = grid.TrainConfig(batch_size=64, resample=resample.ResampleConfig(every=50, dedup_threshold=0.9))
x_eval = grid.toy_batch(world, jax.random.PRNGKey(9), 512)[0]

out = {"params": {}, "cells": {}, "collectives": {}, "shardings": {}}
for n in (1, 2, 8):  # 8: every group padded; 2: some groups padded
    mesh = sharding.make_mesh(n)
    state = grid.init_grid(jax.random.PRNGKey(1), spec, 16, cfg, pad_multiple=n)
    state = sharding.shard_state(state, mesh)
    out["shardings"][n] = [str(g.params.D_MxD.sharding.spec) for g in state.groups]
    # the program that trains below (the call finds it compiled: one compilation, not two)
    hlo = grid.run_toy_chunk.lower(state, world, cfg, 50, grid.mesh_of(state)).compile().as_text()
    ops = r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    out["collectives"][n] = sorted(set(re.findall(ops, hlo)))
    state = grid.train(state, cfg, 150, world=world, chunk=50, progress=False)
    out["params"][n] = [np.asarray(grid.cell_params(state, c).D_MxD).tolist() for c in spec.cells()]
    out["cells"][n] = results.evaluate(state, spec, cfg, x_eval, world.features_HxD)
    out.setdefault("padded_cells", {})[n] = [int(g.valid.shape[0]) for g in state.groups]
print(json.dumps(out))
