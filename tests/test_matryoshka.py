"""Matryoshka BatchTopK: the prefix sizes, the loss and its gradients against the written-out
formula (dense and through the sparse decoder), its flags, and its exports as SAELens and
dictionary_learning load them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import archs, cli, export, sae, sparse, st
from sae_jax.architectures import matryoshka
from sae_jax.errors import UsageError


def test_prefix_sizes():
    assert matryoshka.level_widths(4096, matryoshka.DEFAULT_WIDTHS) == (128, 512, 2048, 4096)
    assert matryoshka.level_widths(384, matryoshka.DEFAULT_WIDTHS) == (12, 48, 192, 384)
    assert matryoshka.level_widths(10, (0.5,)) == (5, 10)  # the whole dictionary is always last
    assert matryoshka.level_widths(8, (0.01, 0.1, 1.0)) == (1, 8)  # equal prefixes count once
    for bad in ((), (0.0, 1.0), (0.5, 1.5), (-0.1,)):
        with pytest.raises(UsageError, match="`matryoshka_widths` must be fractions"):
            matryoshka.level_widths(64, bad)


def _params(rng, m=32, d=8, cells=None):
    lead = () if cells is None else (cells,)
    f = lambda *s: jnp.asarray(rng.standard_normal(lead + s), jnp.float32)  # noqa: E731
    p = sae.SAEParams(0.3 * f(m, d), 0.1 * f(m), f(m, d), f(d))
    return sae.with_threshold(p, jnp.full(lead + (m,), np.log(0.05), jnp.float32))


def _literal_loss(p, x, k, widths):
    """sum over the prefixes w of (1/d)||x - (sum_{j<w} c_j D_j/||D_j|| + b_dec)||^2, c BatchTopK's
    codes of (x - b_dec) (the batch's k B largest pre-activations, ReLU)."""
    pre = (x - p.b_dec_D) @ p.W_enc_MxD.T + p.b_enc_M
    kth = jnp.sort(pre.reshape(-1))[-k * x.shape[0]]
    c = jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)
    atoms = p.D_MxD / jnp.linalg.norm(p.D_MxD, axis=-1, keepdims=True)
    return sum(jnp.mean(jnp.square(x - (c[:, :w] @ atoms[:w] + p.b_dec_D))) for w in widths)


def _arch(widths=(0.25, 0.5, 1.0), k=3):
    return archs.Arch("matryoshka", k, (("widths", widths),))


def test_loss_and_gradients_are_the_written_out_formula(rng):
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((16, 8)) + 1.0, jnp.float32)
    opts = archs.ArchOptions(aux_k_coeff=0.0, sparse="off")
    f = lambda q: archs.loss(q, x, jnp.float32(0), _arch(), "report", None, opts)[0]  # noqa: E731
    g = lambda q: _literal_loss(q, x, 3, (8, 16, 32))  # noqa: E731
    np.testing.assert_allclose(f(p), g(p), rtol=1e-6)
    for name, a, b in zip(type(p)._fields, jax.grad(f)(p), jax.grad(g)(p)):
        if name != "log_threshold_M":  # tracked, not learned: no gradient in either
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_one_level_is_batchtopk(rng):
    p = _params(rng)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    opts = archs.ArchOptions(sparse="off")
    dead = jnp.arange(32) % 5 == 0  # with AuxK on some dead latents: the same term in both
    ours = archs.loss(p, x, jnp.float32(0), _arch((1.0,)), "report", None, opts, dead)
    theirs = archs.loss(p, x, jnp.float32(0), archs.Arch("batchtopk", 3), "report", None, opts, dead)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("native", [True, False])
def test_sparse_decoder_equals_dense_autodiff(rng, native):
    """The prefixes decoded through the sparse kernels (hand-written VJPs), against autodiff of
    the dense formulation, every gradient, under vmap over cells."""
    p = _params(rng, m=64, cells=2)
    x = jnp.asarray(rng.standard_normal((32, 8)) + 2.0, jnp.float32)
    arch = _arch((1 / 16, 0.25, 1.0), 4)

    def grads(mode):
        f = lambda q: archs.loss(q, x, jnp.float32(0), arch, "report", None,  # noqa: E731
                                 archs.ArchOptions(aux_k_coeff=0.0, sparse=mode))
        return jax.vmap(jax.value_and_grad(f, has_aux=True))(p)

    with sparse.kernels(native):
        (l_sp, (aux_sp, kth_sp)), g_sp = grads("on")
    (l_d, (aux_d, kth_d)), g_d = grads("off")
    np.testing.assert_allclose(l_sp, l_d, rtol=1e-5)
    np.testing.assert_allclose(kth_sp, kth_d, rtol=1e-6)
    np.testing.assert_array_equal(aux_sp.fired_M, aux_d.fired_M)
    for field, a, b in zip(type(p)._fields, g_sp, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=field)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small toy grid of BatchTopK and Matryoshka cells with non-default widths, weights written."""
    out = tmp_path_factory.mktemp("matryoshka") / "run"
    assert cli.main(["toy", "--d", "16", "--features", "32", "--mean-active", "2", "--arch",
                     "batchtopk,matryoshka", "--k", "2", "--ratios", "1", "--steps", "1500",
                     "--matryoshka-widths", "0.25,0.5", "--decoder-bias", "mean", "--no-appendix",
                     "--no-figures", "--no-progress", "--out", str(out)]) == 0
    return out


def test_widths_flag_reaches_results_weights_and_exports(run_dir, tmp_path):
    res = json.loads((run_dir / "results.json").read_text())
    assert res["config"]["grid"]["arch_options"] == [["matryoshka", "widths", [0.25, 0.5]]]
    cell = next(c["index"] for c in res["cells"] if c["arch"] == "matryoshka")
    arch = export.cell_arch(run_dir, cell)
    assert arch.name == "matryoshka" and arch.option("widths") == (0.25, 0.5)
    export.export(run_dir, cell, "dictionary-learning", tmp_path / "dl")
    d = st.load(tmp_path / "dl" / "ae.safetensors")
    assert d["group_sizes"].tolist() == [8, 8, 16] and int(d["k"]) == 2
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == "MatryoshkaBatchTopKSAE" and trainer["k"] == 2


def test_exports_reconstruct_as_load_cell(run_dir, tmp_path):
    """SAELens loads it as JumpReLU; dictionary_learning's MatryoshkaBatchTopKSAE computes
    ReLU((x - b_dec) W_enc + b_enc) [> threshold] W_dec + b_dec: both as load_cell."""
    res = json.loads((run_dir / "results.json").read_text())
    cell = next(c["index"] for c in res["cells"] if c["arch"] == "matryoshka")
    x = np.asarray(np.random.default_rng(1).standard_normal((64, 16)), np.float32)
    _, encode, decode = export.load_cell(run_dir, cell)
    ours = np.asarray(decode(encode(x)))
    export.export(run_dir, cell, "saelens", tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    w = st.load(tmp_path / "sl" / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu"
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    x_sl = np.where(pre > w["threshold"], pre, 0) @ w["W_dec"] + w["b_dec"]
    assert np.linalg.norm(x_sl - ours) / np.linalg.norm(ours) <= 1e-5
    export.export(run_dir, cell, "dictionary-learning", tmp_path / "dl")
    d = st.load(tmp_path / "dl" / "ae.safetensors")
    post = np.maximum((x - d["b_dec"]) @ d["W_enc"] + d["b_enc"], 0)
    x_dl = (post * (post > d["threshold"])) @ d["W_dec"] + d["b_dec"]
    assert np.linalg.norm(x_dl - ours) / np.linalg.norm(ours) <= 1e-5


def test_its_first_prefix_reconstructs_alone_and_it_recovers_features(run_dir):
    """What Matryoshka is for: its first quarter of latents, decoded alone, reconstructs the world
    better than the first quarter of a BatchTopK cell trained beside it; and it still recovers
    the world's features."""
    res = json.loads((run_dir / "results.json").read_text())
    cells = {c["arch"]: c for c in res["cells"]}
    assert cells["matryoshka"]["mmcs"] >= 0.75, cells["matryoshka"]["mmcs"]
    gt = np.load(run_dir / "dictionaries.npz")["ground_truth"]
    rng = np.random.default_rng(2)
    x = ((rng.random((2048, gt.shape[0])) < 2 / gt.shape[0]) * rng.random((2048, gt.shape[0]))) @ gt
    x = x.astype(np.float32)

    def prefix_err(arch):
        params, encode, _ = export.load_cell(run_dir, cells[arch]["index"])
        c = np.asarray(encode(x))[:, :8]
        x_hat = c @ np.asarray(sae.dictionary(params))[:8] + np.asarray(params.b_dec_D)
        return float(np.mean(np.square(x - x_hat)))

    assert prefix_err("matryoshka") < 0.8 * prefix_err("batchtopk")


def test_bad_widths_are_one_line_errors(tmp_path, capsys):
    base = ["toy", "--arch", "matryoshka", "--k", "2", "--steps", "5", "--no-appendix", "--no-figures",
            "--out", str(tmp_path / "r")]
    def status(argv):
        try:
            return cli.main(argv)
        except SystemExit as e:
            return e.code

    assert status(base + ["--matryoshka-widths", "0.5,2"]) == 2
    assert status(base[:2] + ["batchtopk"] + base[3:] + ["--matryoshka-widths", "0.5"]) == 2
    assert status(base + ["--matryoshka-widths", "half"]) == 2
    err = capsys.readouterr().err
    assert "--matryoshka-widths must be fractions of the dictionary in (0, 1], got 0.5, 2" in err
    assert "--arch does not include matryoshka" in err
    assert "matryoshka.widths takes numbers, got 'half'" in err
    assert "Traceback" not in err
