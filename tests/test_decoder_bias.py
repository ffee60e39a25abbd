"""The decoder bias b_dec: x - b_dec into the encoder, + b_dec after the decoder, for every
architecture and every gradient path (autodiff, the fused step, the sparse kernels), its initial
values, training, export and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import archs, cli, export, fused, grid, resample, run, sae, sparse, st, toy


def _params(rng, m=24, d=8, cells=None, bias=True):
    lead = () if cells is None else (cells,)
    f = lambda *s: jnp.asarray(rng.standard_normal(lead + s), jnp.float32)  # noqa: E731
    return sae.SAEParams(0.3 * f(m, d), 0.1 * f(m), f(m, d), f(d) if bias else None)


def _literal_loss(p, x, t, alpha):
    """The decoder-bias SAE written out: c = ReLU(W_e (x - b_dec) + b_e), x^ = D^ c + b_dec."""
    c = jax.nn.relu((x - p.b_dec_D) @ p.W_enc_MxD.T + p.b_enc_M)
    x_hat = c @ (p.D_MxD / jnp.linalg.norm(p.D_MxD, axis=-1, keepdims=True)) + p.b_dec_D
    return jnp.mean(jnp.square(t - x_hat)) + alpha * jnp.mean(jnp.sum(c, -1)) / c.shape[-1]


def test_loss_and_gradients_are_the_literal_formula(rng):
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((32, 8)) + 3.0, jnp.float32)
    (total, _), g = jax.value_and_grad(sae.loss, has_aux=True)(p, x, 0.3)
    ref, g_ref = jax.value_and_grad(_literal_loss)(p, x, x, 0.3)
    np.testing.assert_allclose(total, ref, rtol=1e-6)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g.b_dec_D).max()) > 0  # the bias is trained


def test_no_decoder_bias_is_absent_not_zero(rng):
    """decoder_bias "none" leaves the report's parameter tree (three leaves) and its loss as they
    were; a zero bias is a fourth, trained leaf."""
    p = _params(rng, bias=False)
    assert len(jax.tree.leaves(p)) == 3
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    c = jax.nn.relu(x @ p.W_enc_MxD.T + p.b_enc_M)
    want = jnp.mean(jnp.square(x - c @ sae.unit_rows(p.D_MxD))) + 0.1 * jnp.mean(jnp.sum(c, -1)) / 24
    assert float(sae.loss(p, x, 0.1)[0]) == float(want)
    state = grid.init_grid(jax.random.PRNGKey(0), grid.GridSpec.from_ratios([0.1], [1], 8), 8, grid.TrainConfig())
    assert state.groups[0].params.b_dec_D is None and len(jax.tree.leaves(state.groups[0].params)) == 3
    assert "decoder_bias" not in grid.TrainConfig().to_dict()  # old checkpoints' configs still match
    zero = grid.init_grid(jax.random.PRNGKey(0), grid.GridSpec.from_ratios([0.1], [1], 8), 8,
                          grid.TrainConfig(decoder_bias="zero"))
    assert zero.groups[0].params.b_dec_D.shape == (1, 8) and not zero.groups[0].params.b_dec_D.any()


def test_initial_values_mean_and_geometric_median(rng):
    x = rng.standard_normal((400, 5)).astype(np.float32) + np.arange(5, dtype=np.float32)
    x[:20] += 100.0  # 5% outliers: they drag the mean, not the median
    np.testing.assert_allclose(sae.decoder_bias_init(x, "mean"), x.mean(0), rtol=1e-5)
    med = np.asarray(sae.decoder_bias_init(x, "median"))
    unit = (x - med) / np.linalg.norm(x - med, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(0)) < 0.05 * len(x)  # the gradient of sum_n ||x_n - y|| vanishes
    assert np.abs(med - np.arange(5)).max() < 0.3 < np.abs(x.mean(0) - np.arange(5)).max()
    with pytest.raises(ValueError, match="decoder bias init"):
        sae.decoder_bias_init(x, "mode")
    cfg = grid.TrainConfig(decoder_bias="median")
    with pytest.raises(Exception, match="decoder_bias.*needs a data sample"):
        grid.init_grid(jax.random.PRNGKey(0), grid.GridSpec.from_ratios([0.1], [1], 5), 5, cfg)
    state = grid.init_grid(jax.random.PRNGKey(0), grid.GridSpec.from_ratios([0.1, 1], [1, 2], 5), 5, cfg, x_init=x)
    for g in state.groups:
        want = np.broadcast_to(med, g.params.b_dec_D.shape)
        np.testing.assert_allclose(np.asarray(g.params.b_dec_D), want, rtol=1e-6)


@pytest.mark.parametrize("per_cell_input", [False, True])
def test_fused_gradients_equal_autodiff_with_a_decoder_bias(rng, per_cell_input):
    p = _params(rng, cells=3)
    x = jnp.asarray(rng.standard_normal((32, 8)) + 2.0, jnp.float32)
    alpha = jnp.asarray([0.1, 0.3, 1.0], jnp.float32)
    x_in = x + 0.1 * jnp.asarray(rng.standard_normal((3, 32, 8)), jnp.float32) if per_cell_input else x
    (total, aux), g = fused.group_loss_and_grad(p, x_in, alpha, target_BxD=x)
    in_axes = (0, 0 if per_cell_input else None, 0)
    (ref, ref_aux), g_ref = jax.vmap(lambda q, xi, a: jax.value_and_grad(sae.loss, has_aux=True)(q, xi, a, "report", x),
                                     in_axes=in_axes)(p, x_in, alpha)
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    np.testing.assert_allclose(aux.sq_err_B, ref_aux.sq_err_B, rtol=1e-5)
    for name, a, b in zip(sae.SAEParams._fields, g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_decoder_with_a_decoder_bias_equals_dense_autodiff(rng, name, native):
    """The sparse paths (hand-written VJPs, bias folded into the encoder's) against autodiff of
    the dense formulation, every gradient, under vmap over cells."""
    p = _params(rng, m=64, cells=2)
    x = jnp.asarray(rng.standard_normal((32, 8)) + 2.0, jnp.float32)
    arch = archs.Arch(name, 4)
    if arch.has_threshold:
        p = sae.with_threshold(p, jnp.full((2, 64), np.log(0.05), jnp.float32))

    def grads(mode):
        f = lambda q: archs.loss(q, x, jnp.float32(0), arch, "report", None, archs.ArchOptions(sparse=mode))  # noqa: E731
        return jax.vmap(jax.value_and_grad(f, has_aux=True))(p)

    with sparse.kernels(native):
        (l_sp, (aux_sp, _)), g_sp = grads("on")
    (l_d, (aux_d, _)), g_d = grads("off")
    np.testing.assert_allclose(l_sp, l_d, rtol=1e-5)
    np.testing.assert_array_equal(aux_sp.fired_M, aux_d.fired_M)
    for field, a, b in zip(type(p)._fields, g_sp, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=field)
    assert float(jnp.abs(g_sp.b_dec_D).max()) > 0


def test_resampling_keeps_the_decoder_bias_and_its_moments(rng):
    spec = grid.GridSpec.from_ratios([0.1], [1], 8)
    cfg = grid.TrainConfig(decoder_bias="zero", batch_size=16,
                           resample=resample.ResampleConfig(every=5, dead_window=1))
    state = grid.init_grid(jax.random.PRNGKey(0), spec, 8, cfg)
    g = state.groups[0]
    b = jnp.arange(8, dtype=jnp.float32)[None]
    opt = g.opt._replace(mu=g.opt.mu._replace(b_dec_D=b), nu=g.opt.nu._replace(b_dec_D=b))
    g = g.replace(params=g.params._replace(b_dec_D=b), opt=opt, since_fired=jnp.full_like(g.since_fired, 9),
                  pool_x=jnp.asarray(rng.standard_normal(g.pool_x.shape), jnp.float32))
    out = resample.resample_grid(state.replace(groups=(g,)), cfg.resample).groups[0]
    assert int(out.n_resampled[0]) == 8  # every latent was dead
    for leaf in (out.params.b_dec_D, out.opt.mu.b_dec_D, out.opt.nu.b_dec_D):
        np.testing.assert_array_equal(leaf, b)
    assert not np.asarray(out.opt.mu.W_enc_MxD).any()


def _offset_batches(world, offset, batch):
    def batches(start, n):
        keys = [jax.random.fold_in(jax.random.PRNGKey(7), start + i) for i in range(n)]
        return np.stack([np.asarray(toy.sample_inputs(k, world, batch)) + offset for k in keys])
    return batches


@pytest.mark.slow
def test_a_decoder_bias_learns_the_offset_of_the_data():
    """On toy data shifted by a large offset, cells with b_dec (initialised at the mean) recover
    the features; the report's SAE without one spends its latents on the offset."""
    world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=16, features=32, mean_active=2))
    offset = np.asarray(3.0 * jax.random.normal(jax.random.PRNGKey(3), (16,)), np.float32)
    batches = _offset_batches(world, offset, 128)
    spec = grid.GridSpec.from_ratios([0.1, 0.3], [1], 32)
    best = {}
    for bias in ("none", "mean"):
        cfg = grid.TrainConfig(batch_size=128, lr=3e-3, decoder_bias=bias)
        state = grid.init_grid(jax.random.PRNGKey(1), spec, 16, cfg, x_init=batches(10_000, 8).reshape(-1, 16))
        state = grid.train(state, cfg, 2000, batches=batches, progress=False)
        best[bias] = max(float(sae_mmcs(grid.cell_params(state, c), world)) for c in spec.cells())
        if bias == "mean":
            b_dec = np.asarray(state.groups[0].params.b_dec_D)
    assert best["mean"] >= 0.95 > best["none"] + 0.05, best
    # b_dec moved from its start (the data mean) and keeps the offset's direction
    cos = b_dec @ offset / np.linalg.norm(b_dec, axis=1) / np.linalg.norm(offset)
    assert (cos > 0.9).all(), cos


def sae_mmcs(p, world):
    from sae_jax import metrics

    return metrics.mmcs(sae.dictionary(p), world.features_HxD)


@pytest.fixture(scope="module")
def offset_run(tmp_path_factory):
    """`sae-jax grid` on stored activations with an offset (its default decoder bias), every
    architecture, weights written."""
    tmp = tmp_path_factory.mktemp("offset")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2048, 8)) * (rng.random((2048, 8)) < 0.3) + 5.0).astype(np.float32)
    np.save(tmp / "x.npy", x)
    out = tmp / "run"
    assert cli.main(["grid", "--activations", str(tmp / "x.npy"), "--l1", "0.1", "--dict-sizes", "16",
                     "--arch", "relu_l1,topk,batchtopk,jumprelu", "--k", "2", "--l0", "0.1",
                     "--steps", "40", "--batch-size", "32", "--out", str(out), "--no-progress",
                     "--no-figures", "--checkpoint-every", "20", "--eval-samples", "128"]) == 0
    return out, x[:256]


def test_grid_on_activations_trains_a_decoder_bias_by_default(offset_run):
    out, x = offset_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["train"]["decoder_bias"] == "mean"
    for c in range(4):
        w = export.read_cell(out, c)
        assert w["b_dec"].shape == (8,) and np.abs(w["b_dec"] - 5.0).max() < 1.0  # near the data mean
        params, encode, decode = export.load_cell(out, c)
        np.testing.assert_allclose(np.asarray(params.b_dec_D), w["b_dec"])
        c_ = np.asarray(encode(x))
        pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
        if export.cell_arch(out, c).name == "relu_l1":
            np.testing.assert_allclose(c_, np.maximum(pre, 0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(decode(c_)), c_ @ w["D_unit"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def _relu(z):
    return np.maximum(z, 0)


def test_exports_reconstruct_as_load_cell_with_the_bias(offset_run, tmp_path):
    """SAELens's cfg applies b_dec to the input; dictionary_learning's classes that do not get it
    folded into their encoder bias; each reconstructs as load_cell does."""
    out, x = offset_run
    for c in range(4):
        arch = export.cell_arch(out, c)
        _, encode, decode = export.load_cell(out, c)
        ours = np.asarray(decode(encode(x)))
        export.export(out, c, "saelens", tmp_path / f"sl{c}")
        cfg = json.loads((tmp_path / f"sl{c}" / "cfg.json").read_text())
        w = st.load(tmp_path / f"sl{c}" / "sae_weights.safetensors")
        assert cfg["apply_b_dec_to_input"] is True and np.abs(w["b_dec"]).max() > 1
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if arch.name == "relu_l1":
            codes = _relu(pre)
        elif arch.name == "topk":
            codes = np.where(pre >= np.sort(pre, -1)[:, -arch.k:][:, :1], _relu(pre), 0)
        else:
            codes = np.where(pre > w["threshold"], pre, 0)
        rel = np.linalg.norm(codes @ w["W_dec"] + w["b_dec"] - ours) / np.linalg.norm(ours)
        assert rel <= 1e-5, (arch, rel)
        export.export(out, c, "dictionary-learning", tmp_path / f"dl{c}")
        d = st.load(tmp_path / f"dl{c}" / "ae.safetensors")
        if arch.name == "relu_l1":  # AutoEncoderNew: decoder(ReLU(encoder(x)))
            x_hat = _relu(x @ d["encoder.weight"].T + d["encoder.bias"]) @ d["decoder.weight"].T + d["decoder.bias"]
        elif arch.name == "jumprelu":  # JumpReluAutoEncoder, apply_b_dec_to_input False
            p = x @ d["W_enc"] + d["b_enc"]
            x_hat = np.where(p > d["threshold"], p, 0) @ d["W_dec"] + d["b_dec"]
        else:  # AutoEncoderTopK / BatchTopKSAE: encoder(x - b_dec), decoder(c) + b_dec
            p = _relu((x - d["b_dec"]) @ d["encoder.weight"].T + d["encoder.bias"])
            if arch.name == "topk":
                p = np.where(p >= np.sort(p, -1)[:, -arch.k:][:, :1], p, 0)
            else:
                p = np.where(p > d["threshold"], p, 0)
            x_hat = p @ d["decoder.weight"].T + d["b_dec"]
        rel = np.linalg.norm(x_hat - ours) / np.linalg.norm(ours)
        assert rel <= 1e-5, (arch, rel)


def test_resume_keeps_the_checkpoints_decoder_bias(offset_run, tmp_path, capsys):
    """A resumed grid takes its decoder bias from the checkpoint: a run checkpointed without one
    (as every run before the bias existed: its config has no decoder_bias) resumes without one."""
    out, _ = offset_run
    assert run.checkpointed_train_value(str(out), "decoder_bias") == "mean"
    assert run.checkpointed_train_value(str(tmp_path / "nowhere"), "decoder_bias") is None
    data = str(out.parent / "x.npy")
    old = ["grid", "--activations", data, "--l1", "0.1", "--dict-sizes", "16", "--batch-size", "32",
           "--out", str(tmp_path / "old"), "--no-progress", "--no-figures", "--checkpoint-every", "10",
           "--eval-samples", "64"]
    assert cli.main(old + ["--steps", "10", "--decoder-bias", "none"]) == 0
    meta = json.loads((tmp_path / "old" / "results.json").read_text())["config"]["train"]
    assert "decoder_bias" not in meta
    assert cli.main(old + ["--steps", "20", "--resume"]) == 0, capsys.readouterr().err
    assert "b_dec" not in export.read_cell(tmp_path / "old", 0)
    assert cli.main(old + ["--steps", "30", "--resume", "--decoder-bias", "mean"]) == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grid", "--activations", data, "--l1", "0.1", "--dict-sizes", "16", "--decoder-bias", "bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "decoder_bias" in err[0] and "--decoder-bias" in err[1], err


def test_saelens_loads_the_bias_export_and_reconstructs_as_load_cell(offset_run, tmp_path):
    """SAELens itself (the bench extra, which the README's test command installs)."""
    import torch
    from sae_lens import SAE

    out, x = offset_run
    for c in range(4):
        _, encode, decode = export.load_cell(out, c)
        ours = np.asarray(decode(encode(x)))
        export.export(out, c, "saelens", tmp_path / f"sl{c}")
        loaded = SAE.load_from_disk(str(tmp_path / f"sl{c}"))
        assert np.abs(loaded.b_dec.detach().numpy()).max() > 1
        with torch.no_grad():
            x_hat = loaded.decode(loaded.encode(torch.from_numpy(np.array(x)))).numpy()
        assert np.linalg.norm(x_hat - ours) / np.linalg.norm(ours) <= 1e-5
