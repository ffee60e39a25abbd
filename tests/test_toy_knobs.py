"""Toy-world knobs past the report: each one's measured statistical effect."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from sae_jax import toy
from sae_jax.errors import UsageError

BASE = toy.ToyConfig(d=16, features=64, mean_active=3.0)
N_BATCHES, BATCH = 100, 256


@functools.partial(jax.jit, static_argnums=(2, 3))
def _coeffs_jit(world, key, n_batches, batch):
    keys = jax.random.split(key, n_batches)
    return jax.vmap(lambda k: toy.sample(k, world, batch)[1])(keys)


def _active(cfg: toy.ToyConfig, seed: int = 0) -> np.ndarray:
    """Active indicators (n_batches, batch, h) of a world drawn from cfg."""
    world = toy.make_world(jax.random.PRNGKey(seed), cfg)
    return np.asarray(_coeffs_jit(world, jax.random.PRNGKey(seed + 100), N_BATCHES, BATCH)) > 0


def test_jitter_angle_has_the_requested_std():
    """One feature: x = c g', so angle(x, g) = |theta|, theta ~ N(0, sigma^2)."""
    for sigma in (0.0, 0.1, 0.4):
        cfg = toy.ToyConfig(d=16, features=1, mean_active=0.5, jitter=sigma)
        world = toy.make_world(jax.random.PRNGKey(0), cfg)
        x, c = toy.sample(jax.random.PRNGKey(1), world, 8000)
        x, on = np.asarray(x, np.float64), np.asarray(c)[:, 0] > 0
        g = np.asarray(world.features_HxD[0], np.float64)
        cos = np.clip(x[on] @ g / np.linalg.norm(x[on], axis=1), -1, 1)
        rms = np.sqrt(np.mean(np.arccos(cos) ** 2))
        assert abs(rms - sigma) < 0.03 * sigma + 2e-3, (sigma, rms)
        # Coefficients are untouched: |x| = c.
        np.testing.assert_allclose(np.linalg.norm(x[on], axis=1), np.asarray(c)[on, 0], rtol=1e-4)


def test_jittered_directions_are_unit_and_spread_isotropically():
    g = toy.make_world(jax.random.PRNGKey(0), BASE).features_HxD
    dirs = np.asarray(toy.jitter_directions(jax.random.PRNGKey(2), g, 0.3, 500), np.float64)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-5)
    # The mean of g' over samples points along g (no drift to another direction).
    mean = dirs.mean(0)
    cos = np.sum(mean * np.asarray(g), -1) / np.linalg.norm(mean, axis=-1)
    assert cos.min() > 0.99


def test_noise_on_inputs_and_optionally_on_targets():
    sigma = 0.05
    for targets in (False, True):
        cfg = dataclasses.replace(BASE, noise=sigma, noise_targets=targets)
        world = toy.make_world(jax.random.PRNGKey(0), cfg)
        key = jax.random.PRNGKey(3)
        x_in, target, coeffs = toy.sample_with_target(key, world, 4000)
        np.testing.assert_array_equal(np.asarray(toy.sample(key, world, 4000)[0]), np.asarray(x_in))
        clean = np.asarray(coeffs) @ np.asarray(world.features_HxD)
        eps = np.asarray(x_in) - clean
        assert abs(eps.std() - sigma) < 0.02 * sigma
        assert abs(np.corrcoef(eps[:, 0], eps[:, 1])[0, 1]) < 0.05
        expected = np.asarray(x_in) if targets else clean
        np.testing.assert_allclose(np.asarray(target), expected, atol=1e-5)


def test_nonneg_features_are_unit_and_nonnegative():
    world = toy.make_world(jax.random.PRNGKey(0), dataclasses.replace(BASE, nonneg=True))
    g = np.asarray(world.features_HxD)
    assert g.min() >= 0
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    # |N(0,1)| directions: mean pairwise cosine 2/pi, not 0 as for signed directions.
    off = (g @ g.T)[~np.eye(len(g), dtype=bool)]
    assert abs(off.mean() - 2 / np.pi) < 0.05


def _freq_corr(cfg: toy.ToyConfig) -> float:
    """Mean |Pearson r| between features' per-batch frequencies (fresh z per batch)."""
    freq = _active(cfg, seed=9).mean(axis=1)
    emp = np.corrcoef(freq.T)
    return float(np.abs(emp[~np.eye(cfg.features, dtype=bool)]).mean())


def test_correlation_strength_runs_from_independent_to_the_report():
    key = jax.random.PRNGKey(5)
    full = toy.make_world(key, BASE)
    half = toy.make_world(key, dataclasses.replace(BASE, corr_strength=0.5))
    c_full = np.asarray(full.chol_HxH @ full.chol_HxH.T) - 1e-4 * np.eye(BASE.features)
    c_half = np.asarray(half.chol_HxH @ half.chol_HxH.T) - 1e-4 * np.eye(BASE.features)
    off = ~np.eye(BASE.features, dtype=bool)
    np.testing.assert_allclose(c_half[off], 0.5 * c_full[off], atol=1e-4)
    r = {s: _freq_corr(dataclasses.replace(BASE, corr_strength=s)) for s in (0.0, 0.5, 1.0)}
    # Strength 0: independent firing, as for an uncorrelated world (sampling noise only).
    r_none = _freq_corr(dataclasses.replace(BASE, correlated=False))
    assert r[0.0] < 1.2 * r_none, (r, r_none)
    assert r[0.0] < r[0.5] < r[1.0], r


def test_correlation_strength_zero_gives_independent_firing_per_sample():
    """P(i and j active) = P(i) P(j) for every pair, within sampling error."""
    act = _active(dataclasses.replace(BASE, corr_strength=0.0, decay=1.0)).reshape(-1, BASE.features)
    act = act.astype(np.float64)
    p = act.mean(0)
    joint = act.T @ act / len(act)
    se = np.sqrt(np.outer(p, p) / len(act))
    z = ((joint - np.outer(p, p)) / se)[~np.eye(BASE.features, dtype=bool)]
    assert np.abs(z).mean() < 1.2 and np.abs(z).max() < 6, (np.abs(z).mean(), np.abs(z).max())


@pytest.mark.parametrize("a", [0.8, 1.2])  # p_0 < 1: no clipping
def test_zipf_frequencies_have_the_requested_log_log_slope(a):
    cfg = toy.ToyConfig(d=16, features=256, mean_active=3.0, correlated=False, zipf=a)
    act = _active(cfg)
    np.testing.assert_allclose(act.sum(-1).mean(), 3.0, rtol=0.03)
    freq = act.mean(axis=(0, 1))
    ok = freq * act.shape[0] * act.shape[1] > 200  # features with enough firings to measure
    rank = np.arange(1, cfg.features + 1)
    slope = np.polyfit(np.log(rank[ok]), np.log(freq[ok]), 1)[0]
    assert abs(slope + a) < 0.05, slope


@pytest.mark.parametrize("correlated", [False, True])
def test_hierarchy_children_fire_only_with_their_parent(correlated):
    c = 3
    cfg = dataclasses.replace(BASE, hierarchy=c, correlated=correlated, decay=0.98)
    act = _active(cfg).reshape(-1, BASE.features)
    par = np.asarray(toy.parents(BASE.features, c))
    child = par != np.arange(BASE.features)
    assert child.sum() == BASE.features * c // (c + 1)
    orphans = act[:, child] & ~act[:, par[child]]
    assert orphans.sum() == 0
    assert act[:, child].sum() > 1000  # children do fire
    # Children co-fire with their parent far above chance.
    p_child = act[:, child].mean(0)
    p_given_parent = (act[:, child] & act[:, par[child]]).sum(0) / act[:, par[child]].sum(0)
    assert np.median(p_given_parent / p_child) > 5
    if not correlated:  # marginal rates min(p_child, p_parent) = p_child keep the mean active count
        np.testing.assert_allclose(act.sum(-1).mean(), BASE.mean_active, rtol=0.03)


def test_every_knob_together_is_jittable():
    cfg = dataclasses.replace(BASE, corr_strength=0.3, zipf=1.1, hierarchy=2, nonneg=True,
                              jitter=0.1, noise=0.01)
    make = jax.jit(toy.make_world, static_argnums=1)
    world = make(jax.random.PRNGKey(0), cfg)
    x1, c1 = jax.jit(toy.sample, static_argnums=2)(jax.random.PRNGKey(1), world, 32)
    x2, c2 = toy.sample(jax.random.PRNGKey(1), world, 32)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x2), atol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("corr_strength", -0.1), ("corr_strength", 1.5), ("zipf", -1.0), ("hierarchy", -1),
    ("hierarchy", 64), ("jitter", -0.1), ("noise", float("nan")),
])
def test_bad_knob_raises_usage_error(field, value):
    with pytest.raises(UsageError):
        dataclasses.replace(BASE, **{field: value}).validate()


def test_cli_flags_reach_the_world(tmp_path, capsys):
    import json

    from sae_jax import cli

    out = tmp_path / "run"
    rc = cli.main(["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--steps", "10",
                   "--l1", "0.1", "--ratios", "1", "--no-figures", "--no-progress",
                   "--checkpoint-every", "0", "--eval-samples", "64", "--out", str(out),
                   "--corr-strength", "0.5", "--zipf", "1.1", "--hierarchy", "1", "--nonneg",
                   "--jitter", "0.1", "--noise", "0.01"])
    assert rc == 0
    world = json.loads((out / "results.json").read_text())["config"]["world"]
    assert {k: world[k] for k in ("corr_strength", "zipf", "hierarchy", "nonneg", "jitter",
                                  "noise")} == dict(corr_strength=0.5, zipf=1.1, hierarchy=1,
                                                    nonneg=True, jitter=0.1, noise=0.01)
    assert cli.main(["toy", "--zipf", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--zipf must be >= 0" in capsys.readouterr().err
