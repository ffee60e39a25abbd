"""Full weights per cell, load_cell, and exports to SAELens and dictionary_learning (checked with numpy)."""

import json

import jax
import numpy as np
import pytest

from sae_jax import cli, export, grid, sae, st, toy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-size grid with every parameter moved off its init (non-zero biases, non-unit atoms),
    its weights written, and evaluation data."""
    out = tmp_path_factory.mktemp("run")
    world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=12, features=24, mean_active=2))
    spec = grid.GridSpec.from_ratios([0.1, 1.0], [0.5, 1.0], 24)
    state = grid.init_grid(jax.random.PRNGKey(1), spec, 12, grid.TrainConfig(batch_size=32))
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    moved = lambda a: a * 1.7 + 0.1 * jax.random.normal(next(keys), a.shape)  # noqa: E731
    state = state.replace(groups=tuple(g.replace(params=jax.tree.map(moved, g.params)) for g in state.groups))
    x = np.asarray(toy.sample(jax.random.PRNGKey(2), world, 256)[0])
    export.write_weights(out, state, spec, x)
    return out, state, spec, x


def _ours(state, cell, x):
    p = grid.cell_params(state, cell)
    return np.asarray(sae.decode(p, sae.encode(p, x)))


def test_weights_file_holds_every_cell_exactly(trained):
    out, state, spec, x = trained
    head, _ = st.header(out / export.WEIGHTS)
    assert len(head) == 5 * len(spec.cells())
    for c in spec.cells():
        p = grid.cell_params(state, c)
        w = export.read_cell(out, c.index)
        np.testing.assert_array_equal(w["W_enc"], np.asarray(p.W_enc_MxD))
        np.testing.assert_array_equal(w["b_enc"], np.asarray(p.b_enc_M))
        np.testing.assert_array_equal(w["D"], np.asarray(p.D_MxD))
        np.testing.assert_array_equal(w["D_unit"], np.asarray(sae.dictionary(p)))
        fired = np.asarray(sae.encode(p, x)) > 0
        np.testing.assert_allclose(w["firing_freq"], fired.mean(0), atol=1e-7)
        assert w["W_enc"].shape == (c.dict_size, 12)


def test_weights_file_reads_with_the_safetensors_package(trained):
    from safetensors.numpy import load_file

    out, state, spec, _ = trained
    loaded = load_file(str(out / export.WEIGHTS))
    np.testing.assert_array_equal(loaded["cell_3.D"], np.asarray(grid.cell_params(state, spec.cells()[3]).D_MxD))


def test_load_cell_applies_a_trained_sae_in_three_lines(trained):
    out, state, spec, x = trained
    for c in spec.cells():
        params, encode, decode = export.load_cell(out, c.index)
        np.testing.assert_allclose(np.asarray(decode(encode(x))), _ours(state, c, x), rtol=1e-6, atol=1e-6)


def _relu(z):
    return np.maximum(z, 0)


def test_saelens_export_names_shapes_and_reconstruction(trained, tmp_path):
    out, state, spec, x = trained
    cell = spec.cells()[2]
    export.export(out, cell.index, "saelens", tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    m = cell.dict_size
    assert cfg["architecture"] == "standard" and (cfg["d_in"], cfg["d_sae"]) == (12, m)
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    w = st.load(tmp_path / "sl" / "sae_weights.safetensors")
    assert sorted(w) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert [w[k].shape for k in ("W_enc", "W_dec", "b_enc", "b_dec")] == [(12, m), (m, 12), (m,), (12,)]
    np.testing.assert_allclose(np.linalg.norm(w["W_dec"], axis=1), 1.0, rtol=1e-5)
    assert not w["b_dec"].any()
    x_hat = _relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    np.testing.assert_allclose(x_hat, _ours(state, cell, x), rtol=1e-5, atol=1e-6)
    sparsity = st.load(tmp_path / "sl" / "sparsity.safetensors")["sparsity"]
    fired = (np.asarray(sae.encode(grid.cell_params(state, cell), x)) > 0).mean(0)
    np.testing.assert_allclose(sparsity, np.log10(fired + 1e-10), rtol=1e-5)


def test_dictionary_learning_export_names_shapes_and_reconstruction(trained, tmp_path):
    out, state, spec, x = trained
    cell = spec.cells()[1]
    export.export(out, cell.index, "dictionary-learning", tmp_path / "dl")
    w = st.load(tmp_path / "dl" / "ae.safetensors")
    m = cell.dict_size
    assert {k: w[k].shape for k in w} == {"encoder.weight": (m, 12), "encoder.bias": (m,),
                                          "decoder.weight": (12, m), "decoder.bias": (12,)}
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == "AutoEncoderNew" and (trainer["activation_dim"], trainer["dict_size"]) == (12, m)
    # AutoEncoderNew.forward: decoder(ReLU(encoder(x))), nn.Linear(x) = x Wᵀ + b
    x_hat = _relu(x @ w["encoder.weight"].T + w["encoder.bias"]) @ w["decoder.weight"].T + w["decoder.bias"]
    np.testing.assert_allclose(x_hat, _ours(state, cell, x), rtol=1e-5, atol=1e-6)


def test_cli_grid_writes_weights_and_export_round_trips(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    assert cli.main(["grid", "--activations", str(tmp_path / "x.npy"), "--l1", "0.1,1", "--dict-sizes", "8,16",
                     "--steps", "20", "--batch-size", "32", "--out", str(run), "--no-progress", "--no-figures",
                     "--checkpoint-every", "0", "--eval-samples", "64"]) == 0
    dicts = np.load(run / "dictionaries.npz")
    res = json.loads((run / "results.json").read_text())
    for c in res["cells"]:  # the users' metrics sit beside ours in results.json
        assert 1 - c["explained_variance"] == pytest.approx(c["fvu"], abs=1e-5)
        assert 0 <= c["frac_alive"] <= 1 and c["l2_ratio"] > 0 and sum(c["density_hist"]) <= c["dict_size"]
    for i in range(4):
        np.testing.assert_array_equal(export.read_cell(run, i)["D_unit"], dicts[f"decoder_{i}"])
    assert cli.main(["export", str(run), "--cell", "3", "--format", "saelens", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "cfg.json").is_file()
    capsys.readouterr()
    assert cli.main(["export", str(run), "--cell", "4", "--format", "saelens", "--out", str(tmp_path / "f")]) == 2
    assert cli.main(["export", str(tmp_path), "--cell", "0", "--format", "saelens", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--cell 4 is out of range: the run has cells 0..3" in err[0] and "not found" in err[1]


def test_saelens_loads_the_export_and_reconstructs_as_ours(trained, tmp_path):
    """Optional: only where sae_lens is installed (`pip install -e '.[bench]'`)."""
    pytest.importorskip("sae_lens")
    import torch
    from sae_lens import SAE

    out, state, spec, x = trained
    cell = spec.cells()[3]
    export.export(out, cell.index, "saelens", tmp_path / "sl")
    loaded = SAE.load_from_disk(str(tmp_path / "sl"))
    with torch.no_grad():
        x_hat = loaded.decode(loaded.encode(torch.from_numpy(np.array(x)))).numpy()
    np.testing.assert_allclose(x_hat, _ours(state, cell, x), rtol=1e-5, atol=1e-5)


def test_saelens_metadata_names_the_model_and_hook_the_store_recorded(trained, tmp_path):
    out, _, spec, _ = trained
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"source": {
        "model": "sentence-transformers/all-MiniLM-L6-v2", "hook_name": "encoder.layer.1.intermediate"}}))
    (out / "results.json").write_text(json.dumps({"config": {"activations": str(store)}}))
    try:
        export.export(out, 0, "saelens", tmp_path / "sl")
    finally:
        (out / "results.json").unlink()
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["hook_name"] == "encoder.layer.1.intermediate"
    assert meta["sae_jax"]["l1"] == spec.cells()[0].l1_coeff and meta["sae_jax"]["cell"] == 0
