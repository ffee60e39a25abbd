"""Metrics: MMCS (blocked, invariances, bounds), dead latents, FVU, SSLL, MMCS with larger."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import metrics, sae


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _dense_max_cosine(learned, reference):
    """Brute force in float64: for each reference row, its best cosine over learned rows."""
    return (_unit(reference) @ _unit(learned).T).max(axis=1)


def _basis(d, seed=0):
    """A random orthonormal basis of R^d as rows."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q.T


def test_mmcs_of_permuted_sign_preserved_copy_is_one(rng):
    g = rng.standard_normal((40, 16))
    copy = g[rng.permutation(40)] * rng.uniform(0.1, 10.0, (40, 1))  # positive rescaling too
    assert metrics.mmcs(copy, g) == pytest.approx(1.0, abs=1e-5)
    assert metrics.mmcs(g, copy) == pytest.approx(1.0, abs=1e-5)
    # Cosine is signed: a sign-flipped atom is not a match.
    flipped = copy.copy()
    flipped[0] *= -1
    assert metrics.mmcs(flipped, g) < 1.0 - 1e-3


def test_mmcs_of_random_directions_is_low(rng):
    d, m, n = 64, 64, 200
    learned, ref = rng.standard_normal((m, d)), rng.standard_normal((n, d))
    # The expected level: mean over references of the max of m cosines between random directions.
    expected = np.mean([_dense_max_cosine(rng.standard_normal((m, d)),
                                          rng.standard_normal((n, d))).mean() for _ in range(20)])
    value = metrics.mmcs(learned, ref)
    assert expected < 0.4
    assert value == pytest.approx(expected, abs=0.03)
    assert value < 0.45


def test_mmcs_ignores_row_order_and_scale_and_hits_its_extremes(rng):
    """Each atom counts by direction alone; opposite directions give -1, the same ones +1."""
    a, b = rng.standard_normal((9, 4)), rng.standard_normal((13, 4))
    base = np.asarray(metrics.max_cosine(a, b, block=4))
    scaled = a[rng.permutation(9)] * rng.uniform(0.1, 10.0, (9, 1))
    np.testing.assert_allclose(np.asarray(metrics.max_cosine(scaled, b, block=4)), base, atol=1e-6)
    g = rng.standard_normal((1, 8))
    assert metrics.mmcs(-g, g) == pytest.approx(-1.0, abs=1e-6)
    assert metrics.mmcs(g, g) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("m,n,d", [(23, 17, 5), (3, 50, 6), (7, 7, 3), (50, 1, 9)])
def test_blocked_max_cosine_equals_dense(rng, m, n, d):
    learned, ref = rng.standard_normal((m, d)), rng.standard_normal((n, d))
    dense = _dense_max_cosine(learned, ref)
    blocked = np.asarray(metrics.max_cosine(learned, ref, block=7))
    assert blocked.shape == (n,)
    np.testing.assert_allclose(blocked, dense, atol=1e-5)
    np.testing.assert_allclose(metrics.max_cosine(learned, ref), dense, atol=1e-5)  # one block


def test_blocked_max_cosine_masks_padding_and_reads_the_last_partial_block(rng):
    """15 learned rows in blocks of 7: the tail block is padded with 6 zero rows. Reference 0
    has only negative cosines with real rows (padding, if counted, would give 0); reference 1's
    only exact match sits in the tail block."""
    ref = rng.standard_normal((3, 8))
    ref[1] -= (ref[1] @ ref[0] / (ref[0] @ ref[0]) + 0.5) * ref[0]  # cos(ref0, ref1) < 0
    learned = -ref[0] + 0.1 * rng.standard_normal((15, 8))
    learned[14] = ref[1]
    mc = np.asarray(metrics.max_cosine(learned, ref, block=7))
    assert mc[0] < -0.1
    assert mc[1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(mc, _dense_max_cosine(learned, ref), atol=1e-5)


def test_mmcs_is_a_mean_over_the_reference():
    """Not symmetric: a subset of a dictionary matches it fully one way only."""
    g = _basis(16)
    subset = g[:4]
    assert metrics.mmcs(g, subset) == pytest.approx(1.0, abs=1e-6)  # every subset atom found
    assert metrics.mmcs(subset, g) == pytest.approx(4 / 16, abs=1e-6)  # 12 refs have max cos 0


def test_fraction_recovered():
    g = _basis(16)
    learned = np.concatenate([g[:6], 0.5 * g[6:10] + 0.5 * g[10:14]])  # cos(.,g_i) = 0.707
    assert metrics.fraction_recovered(learned, g, 0.9) == pytest.approx(6 / 16)
    assert metrics.fraction_recovered(learned, g, 0.7) == pytest.approx(14 / 16)


def test_dead_latents_equals_brute_force(rng):
    since = rng.integers(0, 25, (3, 4, 30)).astype(np.int32)
    for window in (1, 10, 24):
        brute = np.zeros((3, 4), int)
        for i in range(3):
            for j in range(4):
                brute[i, j] = sum(1 for s in since[i, j] if s >= window)
        np.testing.assert_array_equal(np.asarray(metrics.dead_latents(since, window)), brute)
    assert int(metrics.dead_latents(np.array([9, 10, 11]), 10)) == 2  # window boundary


def _identity_sae(d):
    """m = 2d: c = (relu(x), relu(-x)), x^ = relu(x) - relu(-x) = x exactly."""
    eye = np.eye(d, dtype=np.float32)
    w = np.concatenate([eye, -eye])
    return sae.SAEParams(jnp.asarray(w), jnp.zeros(2 * d), jnp.asarray(w))


def test_fvu_perfect_and_zero_reconstruction(rng):
    d = 8
    x = jnp.asarray(rng.standard_normal((4000, d)), jnp.float32)
    perfect = metrics.reconstruction_stats(_identity_sae(d), x)
    assert float(perfect["fvu"]) == pytest.approx(0.0, abs=1e-10)
    assert float(perfect["recon_loss"]) == pytest.approx(0.0, abs=1e-10)
    assert float(perfect["l0"]) == pytest.approx(d, abs=1e-6)  # exactly one of each pair fires
    # Nothing fires: x^ = 0. For centred data FVU ~ 1; in general sum||t||^2 / sum||t - mean||^2.
    p = _identity_sae(d)
    silent = p._replace(W_enc_MxD=jnp.zeros_like(p.W_enc_MxD), b_enc_M=-jnp.ones(2 * d))
    zero = metrics.reconstruction_stats(silent, x)
    assert float(zero["fvu"]) == pytest.approx(1.0, abs=0.01)
    assert float(zero["l0"]) == 0 and float(zero["l1_loss"]) == 0
    shifted = x + 3.0
    xs = np.asarray(shifted, np.float64)
    expected = (xs ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    assert float(metrics.reconstruction_stats(silent, shifted)["fvu"]) == pytest.approx(expected, rel=1e-4)


def test_group_stats_is_per_cell_reconstruction_stats(rng):
    d, m, cells = 6, 10, 3
    keys = jax.random.split(jax.random.PRNGKey(0), cells)
    params = jax.vmap(lambda k: sae.init(k, d, m))(keys)
    x = jnp.asarray(rng.standard_normal((64, d)), jnp.float32)
    stats = metrics.group_stats(params, x, x, "sum")
    for i in range(cells):
        one = metrics.reconstruction_stats(jax.tree.map(lambda a: a[i], params), x, convention="sum")
        _, aux = sae.loss(jax.tree.map(lambda a: a[i], params), x, 0.0, "sum")
        for name in one:
            assert float(stats[name][i]) == pytest.approx(float(one[name]), rel=1e-5)
        assert float(one["recon_loss"]) == pytest.approx(float(aux.mse), rel=1e-5)
        assert float(one["l1_loss"]) == pytest.approx(float(aux.l1), rel=1e-5)


def test_standardized_log_and_ssll():
    recon = np.array([[1e-3, 2e-3, np.nan], [0.0, 5e-2, 1e-1], [3e-2, np.inf, 4e-3]])
    l1 = np.array([[0.5, 0.2, 0.1], [0.05, -1.0, 0.01], [0.3, 0.2, 0.02]])
    z = metrics.standardized_log(recon)
    bad = ~np.isfinite(recon) | (recon <= 0)
    assert np.all(np.isnan(z[bad])) and np.all(np.isfinite(z[~bad]))
    assert z[~bad].mean() == pytest.approx(0.0, abs=1e-12)
    assert z[~bad].std() == pytest.approx(1.0, abs=1e-12)
    logs = np.log(recon[~bad])
    np.testing.assert_allclose(z[~bad], (logs - logs.mean()) / logs.std())
    s = metrics.ssll(recon, l1)
    np.testing.assert_allclose(s, z + metrics.standardized_log(l1))
    both_ok = ~bad & (l1 > 0)
    assert np.all(np.isfinite(s[both_ok])) and np.all(np.isnan(s[~both_ok]))
    # Fewer than two usable values: nothing to standardise against.
    assert np.all(np.isnan(metrics.standardized_log(np.array([1.0, np.nan, 0.0]))))
    # Constant values standardise to 0, not NaN.
    np.testing.assert_array_equal(metrics.standardized_log(np.array([2.0, 2.0])), [0.0, 0.0])


def test_mmcs_with_larger_uses_next_two_sizes_at_same_alpha_and_seed():
    e = _basis(32)
    a, b = 0.1, 0.3
    dicts = {
        (a, 4, 0): e[:4],
        (a, 8, 0): e[:8],  # contains the size-4 atoms: MMCS 1 over the smaller
        (a, 16, 0): e[8:24],  # orthogonal to the size-4 and size-8 atoms: MMCS 0
        (a, 32, 0): e,  # third larger than size 4: must not count for it
        (b, 8, 0): e[20:28],  # other alpha: must not count
        (a, 8, 1): e[20:28],  # other seed: must not count
        (a, 4, 1): e[:4],
    }
    out = metrics.mmcs_with_larger(dicts)
    assert out[(a, 4, 0)] == pytest.approx(0.5, abs=1e-6)  # mean(1, 0)
    assert out[(a, 8, 0)] == pytest.approx(0.5, abs=1e-6)  # sizes 16 (0) and 32 (1)
    assert out[(a, 16, 0)] == pytest.approx(1.0, abs=1e-6)  # only size 32 is larger
    assert np.isnan(out[(a, 32, 0)])
    assert np.isnan(out[(b, 8, 0)])
    assert out[(a, 4, 1)] == pytest.approx(0.0, abs=1e-6)  # only (a, 8, 1), orthogonal
    assert metrics.mmcs_with_larger(dicts, n_larger=3)[(a, 4, 0)] == pytest.approx(2 / 3, abs=1e-6)


def test_plane_averages_seeds_and_skips_nan():
    grid = metrics.plane([1.0, 3.0, np.nan, 5.0, np.nan], [0.1, 0.1, 0.3, 0.3, 0.1],
                         [1.0, 1.0, 1.0, 2.0, 2.0], [0.1, 0.3], [1.0, 2.0])
    np.testing.assert_array_equal(grid, [[2.0, np.nan], [np.nan, 5.0]])
