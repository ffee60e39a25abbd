"""Full weights per cell, load_cell, and exports to SAELens and dictionary_learning (checked with numpy)."""

import json

import jax
import numpy as np
import pytest

from sae_jax import archs, cli, export, grid, sae, st, toy


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
    return np.asarray(sae.decode(p, archs.encode(p, x, cell.arch_spec)))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One cell of each architecture (m 8, d 6, k 2), parameters moved off their init, random
    per-latent JumpReLU thresholds and one BatchTopK threshold, weights written with an evaluation batch."""
    out = tmp_path_factory.mktemp("mixed")
    spec = grid.GridSpec((0.1,), (8,), archs=archs.ARCHS, k=(2,), l0_coeff=(0.1,))
    state = grid.init_grid(jax.random.PRNGKey(3), spec, 6, grid.TrainConfig(batch_size=16))
    rng = np.random.default_rng(4)

    def moved(g):
        p = jax.tree.map(lambda a: a * 1.7 + 0.1 * rng.normal(size=a.shape).astype(np.float32), g.params)
        if g.arch.name == "jumprelu":
            p = p._replace(log_threshold_M=np.log(rng.uniform(0.2, 1.0, p.b_enc_M.shape)).astype(np.float32))
        if g.arch.name in ("batchtopk", "matryoshka"):
            p = p._replace(log_threshold_M=np.full(p.b_enc_M.shape, np.log(0.5), np.float32))
        return g.replace(params=p)

    state = state.replace(groups=tuple(moved(g) for g in state.groups))
    x = rng.normal(size=(64, 6)).astype(np.float32)
    export.write_weights(out, state, spec, x)
    return out, state, spec, x


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
        np.testing.assert_allclose(w["D_unit"], np.asarray(sae.dictionary(p)), rtol=0, atol=3e-7)
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


def test_every_architecture_round_trips_through_the_weights_file(mixed):
    out, state, spec, x = mixed
    cells = json.loads(st.metadata(out / export.WEIGHTS)["cells"])
    assert [(c["arch"], c["k"], c["l0_coeff"]) for c in cells] == [
        ("relu_l1", 0, 0.0), ("topk", 2, 0.0), ("batchtopk", 2, 0.0), ("jumprelu", 0, 0.1), ("matryoshka", 2, 0.0)]
    for c in spec.cells():
        p = grid.cell_params(state, c)
        w = export.read_cell(out, c.index)
        assert ("threshold" in w) == (c.arch in ("batchtopk", "jumprelu", "matryoshka"))
        if "threshold" in w:
            np.testing.assert_array_equal(w["threshold"], np.asarray(archs.threshold(p)))
        assert export.cell_arch(out, c.index) == c.arch_spec
        params, encode, decode = export.load_cell(out, c.index)
        assert type(params) is type(p)
        codes, want = np.asarray(encode(x)), np.asarray(archs.encode(p, x, c.arch_spec))
        np.testing.assert_allclose(codes, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(decode(codes)), _ours(state, c, x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(w["firing_freq"], (want > 0).mean(0), atol=1e-7)
        assert 0 < (want > 0).mean() < 1
        if c.arch != "relu_l1":  # the architecture changes the codes, so loading must honour it
            assert not np.allclose(codes, np.asarray(sae.encode(p, x)))
        if c.arch == "topk":
            assert ((codes > 0).sum(-1) <= 2).all()


def _rewrite(src, dst, tensors=lambda t: t, cells=lambda c: c):
    """A copy of a weights file with its tensors and cells metadata edited."""
    meta = st.metadata(src / export.WEIGHTS)
    meta["cells"] = json.dumps(cells(json.loads(meta["cells"])))
    dst.mkdir()
    st.save(dst / export.WEIGHTS, tensors({k: np.array(v) for k, v in st.load(src / export.WEIGHTS).items()}), meta)
    return dst


def test_a_weights_file_without_architectures_loads_as_relu_l1(trained, tmp_path):
    out, state, spec, x = trained
    old = _rewrite(out, tmp_path / "old", cells=lambda cs: [{k: c[k] for k in ("index", "l1", "dict_size", "seed")}
                                                            for c in cs])
    cell = spec.cells()[1]
    assert export.cell_arch(old, cell.index) == archs.RELU_L1
    params, encode, decode = export.load_cell(old, cell.index)
    assert type(params) is sae.SAEParams
    np.testing.assert_allclose(np.asarray(decode(encode(x))), _ours(state, cell, x), rtol=1e-6, atol=1e-6)


def _topk(h, k):
    """torch.topk(h, k) along the last axis, ReLU on the kept values, scattered into zeros."""
    idx = np.argsort(-h, axis=-1)[..., :k]
    out = np.zeros_like(h)
    np.put_along_axis(out, idx, _relu(np.take_along_axis(h, idx, -1)), -1)
    return out


def _saelens_forward(cfg, w, x):
    """SAELens 6's StandardSAE / TopKSAE / JumpReLUSAE encode then decode, from its source."""
    pre = x @ w["W_enc"] + w["b_enc"]
    norm = np.linalg.norm(w["W_dec"], axis=-1) if cfg.get("rescale_acts_by_decoder_norm") else 1.0
    acts = {"standard": lambda: _relu(pre), "topk": lambda: _topk(pre * norm, cfg["k"]) / norm,
            "jumprelu": lambda: _relu(pre) * (pre > w["threshold"])}[cfg["architecture"]]()
    return acts @ w["W_dec"] + w["b_dec"]


def test_saelens_export_of_every_architecture_reconstructs_as_ours(mixed, tmp_path):
    out, state, spec, x = mixed
    for c in spec.cells():
        export.export(out, c.index, "saelens", tmp_path / c.arch)
        cfg = json.loads((tmp_path / c.arch / "cfg.json").read_text())
        w = st.load(tmp_path / c.arch / "sae_weights.safetensors")
        assert cfg["architecture"] == {"relu_l1": "standard", "topk": "topk"}.get(c.arch, "jumprelu")
        assert cfg.get("k") == (2 if c.arch == "topk" else None) and cfg["metadata"]["sae_jax"]["arch"] == c.arch
        assert ("threshold" in w) == (cfg["architecture"] == "jumprelu") and not w["b_dec"].any()
        np.testing.assert_allclose(_saelens_forward(cfg, w, x), _ours(state, c, x), rtol=1e-5, atol=1e-6)


def _dictionary_learning_forward(cls, w, x):
    """dictionary_learning's AutoEncoderNew / AutoEncoderTopK / BatchTopKSAE / JumpReluAutoEncoder
    forward (default encode), from its source; nn.Linear(x) = x Wᵀ + b."""
    if cls == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        return _relu(pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":  # every group active
        post = _relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        return (post * (post > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    if cls == "AutoEncoderNew":
        return _relu(x @ w["encoder.weight"].T + w["encoder.bias"]) @ w["decoder.weight"].T + w["decoder.bias"]
    post = _relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    acts = _topk(post, int(w["k"])) if cls == "AutoEncoderTopK" else post * (post > w["threshold"])
    return acts @ w["decoder.weight"].T + w["b_dec"]


def test_dictionary_learning_export_of_every_architecture_reconstructs_as_ours(mixed, tmp_path):
    out, state, spec, x = mixed
    for c in spec.cells():
        export.export(out, c.index, "dictionary-learning", tmp_path / c.arch)
        trainer = json.loads((tmp_path / c.arch / "config.json").read_text())["trainer"]
        w = st.load(tmp_path / c.arch / "ae.safetensors")
        cls = {"relu_l1": "AutoEncoderNew", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
               "jumprelu": "JumpReluAutoEncoder", "matryoshka": "MatryoshkaBatchTopKSAE"}[c.arch]
        assert trainer["dict_class"] == cls and (trainer["activation_dim"], trainer["dict_size"]) == (6, 8)
        if c.arch in ("topk", "batchtopk"):  # 0-d buffers, as torch's register_buffer holds them
            assert trainer["k"] == 2 and (w["k"].shape, w["k"].dtype, w["threshold"].shape) == ((), np.int32, ())
        np.testing.assert_allclose(_dictionary_learning_forward(cls, w, x), _ours(state, c, x), rtol=1e-5, atol=1e-6)


def test_batchtopk_with_per_latent_thresholds_has_no_dictionary_learning_form(mixed, tmp_path, capsys):
    out = mixed[0]

    def vary(t):
        t["cell_2.threshold"] = t["cell_2.threshold"] * np.linspace(1, 2, 8, dtype=np.float32)
        return t

    bad = _rewrite(out, tmp_path / "bad", tensors=vary)
    assert cli.main(["export", str(bad), "--cell", "2", "--format", "dictionary-learning", "--out",
                     str(tmp_path / "dl")]) == 2
    assert capsys.readouterr().err.strip() == (
        "sae-jax: error: dictionary_learning's BatchTopKSAE holds one threshold; "
        "this cell's thresholds differ by latent")
    assert not (tmp_path / "dl").exists()


def test_saelens_loads_the_export_and_reconstructs_as_ours(trained, mixed, tmp_path):
    """SAELens itself (the bench extra, which the README's test command installs)."""
    import torch
    from sae_lens import SAE

    out, state, spec, x = trained
    cases = [(out, state, spec.cells()[3], x)] + [(mixed[0], mixed[1], c, mixed[3]) for c in mixed[2].cells()]
    for run, st_, cell, xs in cases:
        export.export(run, cell.index, "saelens", tmp_path / f"sl{cell.index}")
        loaded = SAE.load_from_disk(str(tmp_path / f"sl{cell.index}"))
        assert type(loaded).__name__ == {"relu_l1": "StandardSAE", "topk": "TopKSAE"}.get(cell.arch, "JumpReLUSAE")
        with torch.no_grad():
            x_hat = loaded.decode(loaded.encode(torch.from_numpy(np.array(xs)))).numpy()
        np.testing.assert_allclose(x_hat, _ours(st_, cell, xs), rtol=1e-5, atol=1e-5)


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
