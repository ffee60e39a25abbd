"""The SAE users' metrics against closed forms: an exact autoencoder, a scaled one, a dead latent."""

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import metrics, quality, sae


def _exact(d: int, scale: float = 1.0, dead: int = 0) -> sae.SAEParams:
    """c = [ReLU(s x), ReLU(−s x)], atoms [I; −I]: x̂ = s x. `dead` extra latents never fire."""
    eye = np.eye(d, dtype=np.float32)
    w = np.concatenate([eye, -eye, np.ones((dead, d), np.float32)]) * scale
    b = np.concatenate([np.zeros(2 * d), -1e9 * np.ones(dead)]).astype(np.float32)
    atoms = np.concatenate([eye, -eye, np.ones((dead, d), np.float32)])
    return sae.SAEParams(jnp.asarray(w), jnp.asarray(b), jnp.asarray(atoms))


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(loc=0.5, size=(4096, 6)).astype(np.float32)


def test_an_exact_autoencoder_scores_perfectly(x):
    q = quality.cell_quality(_exact(6), x)
    for k in ("explained_variance", "l2_ratio", "rel_recon_bias", "frac_alive"):
        assert float(q[k]) == pytest.approx(1.0, abs=1e-5), k


@pytest.mark.parametrize("s", [0.5, 1.3])
def test_a_scaled_reconstruction_matches_the_closed_forms(x, s):
    q = quality.cell_quality(_exact(6, scale=s), x)
    sq = np.sum(x.astype(np.float64) ** 2, -1).mean()
    variance = sq - np.sum(x.mean(0, dtype=np.float64) ** 2)
    assert float(q["explained_variance"]) == pytest.approx(1 - (1 - s) ** 2 * sq / variance, rel=1e-4)
    assert float(q["l2_ratio"]) == pytest.approx(s, rel=1e-5)
    assert float(q["rel_recon_bias"]) == pytest.approx(s, rel=1e-5)
    # the separately-averaged formula is 1 − FVU (FVU sums error and variance over the batch)
    fvu = metrics.reconstruction_stats(_exact(6, scale=s), jnp.asarray(x))["fvu"]
    assert float(q["explained_variance"]) == pytest.approx(1 - float(fvu), rel=1e-4)
    # ... and not the mean of per-sample ratios, which differs on data with a non-zero mean
    per_sample = 1 - np.mean((1 - s) ** 2 * np.sum(x**2, -1) / np.sum((x - x.mean(0)) ** 2, -1))
    assert abs(per_sample - float(q["explained_variance"])) > 1e-3


def test_dead_latents_lower_frac_alive_and_leave_the_density_histogram(x):
    q = quality.cell_quality(_exact(6, dead=4), x)
    assert float(q["frac_alive"]) == pytest.approx(12 / 16)
    assert int(np.sum(q["density_hist"])) == 12
    freq = np.asarray(q["firing_freq"])
    expected = np.mean(np.concatenate([x > 0, x < 0], 1), 0)
    np.testing.assert_allclose(freq[:12], expected, atol=1e-6)
    bins = np.digitize(np.log10(expected), quality.DENSITY_BINS[1:-1])
    np.testing.assert_array_equal(np.asarray(q["density_hist"]), np.bincount(bins, minlength=24))


def test_density_figure_draws_every_size(tmp_path, x):
    q = quality.cell_quality(_exact(6, dead=4), x)
    cells = [{"dict_size": m, "l1": a, "seed": 0, "density_hist": [int(v) for v in q["density_hist"]]}
             for m in (8, 16) for a in (0.1, 1.0)]
    figs = quality.density_figure({"cells": cells}, str(tmp_path / "figures"))
    assert (tmp_path / "figures" / "latent_density.png").stat().st_size > 1000
    assert list(figs) == ["latent_density"]
