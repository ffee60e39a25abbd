"""The SAE grid trained from an activation store, as from the toy sampler."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import activations, cli, grid, metrics, toy


def test_batches_path_equals_toy_path_on_the_same_batches():
    world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=16, features=32, mean_active=3))
    spec = grid.GridSpec.from_ratios([0.1, 1.0], [0.5, 1.0], 32)
    cfg = grid.TrainConfig(batch_size=32)
    state = grid.init_grid(jax.random.PRNGKey(1), spec, 16, cfg)
    from_toy, _ = grid.run_toy_chunk(state, world, cfg, 30)
    xs = jnp.stack([grid.toy_batch(world, jax.random.fold_in(state.data_key, t), 32)[0] for t in range(30)])
    from_batches, _ = grid.run_batches_chunk(state, xs, cfg)
    for a, b in zip(jax.tree.leaves(from_toy), jax.tree.leaves(from_batches)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sae_jax_grid_on_a_store_recovers_the_features(tmp_path, capsys):
    world = toy.make_world(jax.random.PRNGKey(3), toy.ToyConfig(d=16, features=32, mean_active=2))
    x, _ = toy.sample(jax.random.PRNGKey(4), world, 60_000)
    store = tmp_path / "store"
    activations.write_store(store, np.asarray(x), shard_rows=7_000)
    out = tmp_path / "grid"
    code = cli.main(["grid", "--activations", str(store), "--l1", "0.3,1,3", "--dict-sizes", "16,32,64",
                     "--steps", "2500", "--recipe", "fast",
                     "--eval-samples", "2048", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert [c["dict_size"] for c in res["cells"]] == [16] * 3 + [32] * 3 + [64] * 3
    assert all(c["mmcs"] is None for c in res["cells"])  # no ground truth on stored activations
    assert res["ground_truth_optimum"] is None and res["suggested"]["ratio"] is not None
    dicts = np.load(out / "dictionaries.npz")
    assert "ground_truth" not in dicts.files
    best = max(metrics.mmcs(dicts[f"decoder_{c['index']}"], world.features_HxD)
               for c in res["cells"] if c["dict_size"] == 32)
    assert best >= 0.95, best
    for fig in ("fig11_lm_dead_latents", "fig12_lm_ssll", "fig13_lm_mmcs_with_larger"):
        assert (out / "figures" / f"{fig}.png").exists()
        assert f"{fig}.png" in (out / "REPORT.md").read_text()
