"""Toy world: unit features, the mean number of active features, decay, correlation, purity."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import toy
from sae_jax.errors import UsageError

N_BATCHES, BATCH = 200, 256  # one shape everywhere, so worlds of one kind share a compile


@functools.partial(jax.jit, static_argnums=(2, 3))
def _activity_jit(world, key, n_batches, batch):
    keys = jax.random.split(key, n_batches)
    return jax.vmap(lambda k: toy.sample(k, world, batch)[1] > 0)(keys)


def _activity(world: toy.ToyWorld, key, n_batches: int, batch: int) -> np.ndarray:
    """Active indicators of n_batches independent batches: bool (n_batches, batch, h)."""
    return np.asarray(_activity_jit(world, key, n_batches, batch))


def test_features_are_unit_rows(tiny_world, tiny_cfg):
    g = np.asarray(tiny_world.features_HxD, np.float64)
    assert g.shape == (tiny_cfg.features, tiny_cfg.d)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    # Distinct random directions, not one repeated row.
    gram = g @ g.T
    assert np.max(np.abs(gram - np.diag(np.diag(gram)))) < 0.99


def test_x_is_coeffs_times_features(tiny_world):
    x, coeffs = toy.sample(jax.random.PRNGKey(3), tiny_world, 512)
    x, coeffs = np.asarray(x, np.float64), np.asarray(coeffs, np.float64)
    np.testing.assert_allclose(x, coeffs @ np.asarray(tiny_world.features_HxD, np.float64), atol=1e-5)
    active = coeffs[coeffs > 0]
    assert coeffs.min() >= 0 and coeffs.max() < 1
    # Active coefficients are U(0, 1): mean 1/2, variance 1/12.
    assert abs(active.mean() - 0.5) < 0.05
    assert abs(active.var() - 1 / 12) < 0.015


@pytest.mark.parametrize("correlated,fresh_z,k", [
    (True, True, 3.0), (True, True, 5.0), (True, False, 3.0), (False, True, 3.0)])
def test_mean_active_features(tiny_cfg, correlated, fresh_z, k):
    cfg = dataclasses.replace(tiny_cfg, mean_active=k, correlated=correlated, fresh_z=fresh_z)
    world = toy.make_world(jax.random.PRNGKey(11), cfg)
    act = _activity(world, jax.random.PRNGKey(12), N_BATCHES, BATCH)
    mean_active = act.sum(-1).mean()
    assert abs(mean_active - k) / k < 0.03, mean_active


def test_decay_makes_early_features_more_frequent(tiny_cfg):
    h = tiny_cfg.features
    lam = 0.95
    for correlated in (False, True):
        cfg = dataclasses.replace(tiny_cfg, decay=lam, correlated=correlated, fresh_z=True)
        world = toy.make_world(jax.random.PRNGKey(5), cfg)
        freq = _activity(world, jax.random.PRNGKey(6), N_BATCHES, BATCH).mean(axis=(0, 1))
        assert freq[0] > 2.5 * freq[h - 1], (correlated, freq[0], freq[h - 1])
        assert freq[: h // 4].mean() > 2 * freq[-h // 4:].mean()
        if not correlated:
            # p_i is exactly proportional to lambda^i: the ratio of the ends is lambda^-(h-1).
            assert freq[0] / freq[h - 1] == pytest.approx(lam ** -(h - 1), rel=0.15)


def test_uncorrelated_probs_follow_decay_exactly(tiny_cfg):
    key = jax.random.PRNGKey(2)
    flat = toy.make_world(key, dataclasses.replace(tiny_cfg, correlated=False, fresh_z=False))
    decay = tiny_cfg.decay ** np.arange(tiny_cfg.features)
    expected = decay * tiny_cfg.mean_active / tiny_cfg.features / decay.mean()
    np.testing.assert_allclose(np.asarray(flat.probs_H), expected, rtol=1e-5)
    # With correlation (one fixed z) the base rates are decay * Phi(z_i): far from proportional.
    corr = toy.make_world(key, dataclasses.replace(tiny_cfg, correlated=True, fresh_z=False))
    shape = np.asarray(corr.probs_H) / decay
    assert shape.std() / shape.mean() > 0.2
    np.testing.assert_allclose(np.asarray(corr.probs_H).sum(), tiny_cfg.mean_active, rtol=1e-5)


def test_fixed_z_keeps_rates_fresh_z_redraws_them(tiny_cfg):
    """Per-batch feature frequencies: binomial noise around probs_H for a fixed z; far more
    spread than binomial noise for a fresh z per batch."""
    n_batches, batch = N_BATCHES, BATCH
    spread = {}
    for fresh in (False, True):
        world = toy.make_world(jax.random.PRNGKey(4), dataclasses.replace(tiny_cfg, fresh_z=fresh))
        freq_BxH = _activity(world, jax.random.PRNGKey(8), n_batches, batch).mean(axis=1)
        p = freq_BxH.mean(axis=0)
        binomial_var = p * (1 - p) / batch
        spread[fresh] = np.mean(freq_BxH.var(axis=0, ddof=1) / binomial_var)
        if not fresh:
            probs = np.asarray(world.probs_H)
            se = np.sqrt(probs * (1 - probs) / (n_batches * batch))
            assert np.all(np.abs(p - probs) < 5 * se + 1e-6)
    assert 0.7 < spread[False] < 1.3, spread
    assert spread[True] > 5, spread


def test_correlation_drives_coactivation(tiny_cfg):
    """With a fresh z per batch, per-batch frequencies of features i and j co-vary as C_ij does;
    without correlation they are independent."""
    n_batches, batch = N_BATCHES, BATCH
    pearson = {}
    for correlated in (True, False):
        cfg = dataclasses.replace(tiny_cfg, correlated=correlated, fresh_z=True)
        world = toy.make_world(jax.random.PRNGKey(9), cfg)
        c_hh = np.asarray(world.chol_HxH @ world.chol_HxH.T)
        freq_BxH = _activity(world, jax.random.PRNGKey(10), n_batches, batch).mean(axis=1)
        emp = np.corrcoef(freq_BxH.T)
        off = ~np.eye(cfg.features, dtype=bool)
        pearson[correlated] = np.corrcoef(emp[off], c_hh[off])[0, 1]
    assert pearson[True] > 0.6, pearson
    assert abs(pearson[False]) < 0.25, pearson


@pytest.mark.parametrize("fresh_z", [True, False])
def test_sampling_is_pure_jittable_and_keyed(tiny_cfg, fresh_z):
    cfg = dataclasses.replace(tiny_cfg, fresh_z=fresh_z)
    world = toy.make_world(jax.random.PRNGKey(0), cfg)
    key = jax.random.PRNGKey(21)
    jitted = jax.jit(toy.sample, static_argnums=2)
    x1, c1 = jitted(key, world, 64)
    x2, c2 = toy.sample(key, world, 64)
    x3, c3 = jitted(key, world, 64)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_allclose(x1, x2, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x3))
    _, c4 = jitted(jax.random.PRNGKey(22), world, 64)
    assert not np.array_equal(np.asarray(c1), np.asarray(c4))
    assert x1.shape == (64, cfg.d) and c1.shape == (64, cfg.features)


def test_make_world_is_jittable_and_keyed(tiny_cfg):
    make = jax.jit(toy.make_world, static_argnums=1)
    w1, w2 = make(jax.random.PRNGKey(0), tiny_cfg), toy.make_world(jax.random.PRNGKey(0), tiny_cfg)
    for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w2)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    w3 = make(jax.random.PRNGKey(1), tiny_cfg)
    assert not np.allclose(w1.features_HxD, w3.features_HxD)


@pytest.mark.parametrize("field,value", [
    ("d", 0), ("d", -3), ("features", 0), ("mean_active", 0.0), ("mean_active", 33.0),
    ("mean_active", float("nan")), ("decay", 0.0), ("decay", 1.5),
])
def test_bad_config_raises_usage_error(tiny_cfg, field, value):
    cfg = dataclasses.replace(tiny_cfg, **{field: value})
    with pytest.raises(UsageError):
        cfg.validate()
    with pytest.raises(UsageError):
        toy.make_world(jax.random.PRNGKey(0), cfg)


def test_mean_active_may_equal_features(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, mean_active=float(tiny_cfg.features), decay=1.0,
                              correlated=False)
    world = toy.make_world(jax.random.PRNGKey(0), cfg)
    _, coeffs = toy.sample(jax.random.PRNGKey(1), world, 8)
    assert bool(jnp.all(coeffs > 0))  # every feature always active
