"""Resampling: which latents are recycled, what they become, and what stays untouched."""

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import grid, resample, sae

D, M, P, WORST, WINDOW, THR = 8, 12, 64, 8, 5, 0.9
EXPECTED = [0, 5, 7, 9]  # dead: 0, 7 (and 5); duplicates of an earlier atom: 5 (of 2), 9 (of 1)

_resample = jax.jit(resample.resample_cell, static_argnums=(3, 4, 5))


def _cell(seed: int = 0) -> grid.GroupState:
    """One unbatched cell with random Adam moments, two duplicate atoms and three dead latents."""
    spec = grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(M,))
    state = grid.init_grid(jax.random.PRNGKey(seed), spec, D)
    cell = jax.tree.map(lambda a: a[0], state.groups[0])
    rng = np.random.default_rng(seed)
    dec = rng.standard_normal((M, D)).astype(np.float32)
    dec[5] = 3.0 * dec[2] + 0.05 * rng.standard_normal(D)  # later duplicate of 2 (rescaled)
    dec[9] = 0.5 * dec[1]  # later duplicate of 1
    since = np.array([WINDOW, 0, 1, WINDOW - 1, 2, WINDOW + 3, 0, 99, 1, 0, 3, 0], np.int32)
    params = sae.SAEParams(jnp.asarray(rng.standard_normal((M, D)), jnp.float32),
                           jnp.asarray(rng.standard_normal(M), jnp.float32), jnp.asarray(dec))
    noise = lambda t: jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), t)
    opt = cell.opt._replace(mu=noise(cell.opt.mu), nu=jax.tree.map(jnp.abs, noise(cell.opt.nu)),
                            count=jnp.asarray(17, cell.opt.count.dtype))
    return cell.replace(params=params, opt=opt, since_fired=jnp.asarray(since),
                        n_resampled=jnp.asarray(3, jnp.int32))


def _pool(seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((P, D)), jnp.float32)


def _brute_mask(cell, window, thr):
    dec = np.asarray(cell.params.D_MxD, np.float64)
    dec = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    since = np.asarray(cell.since_fired)
    mask = np.zeros(M, bool)
    for j in range(M):
        mask[j] = since[j] >= window or (thr > 0 and any(dec[j] @ dec[i] > thr for i in range(j)))
    return mask


def _np_reconstruct(p, x):
    w, b, dec = (np.asarray(a, np.float64) for a in p[:3])
    c = np.maximum(x @ w.T + b, 0)
    return c @ (dec / np.linalg.norm(dec, axis=1, keepdims=True))


def test_recycle_mask_is_dead_plus_later_duplicates():
    cell = _cell()
    mask = np.asarray(resample.recycle_mask(cell.params, cell.since_fired, WINDOW, THR))
    brute = _brute_mask(cell, WINDOW, THR)
    np.testing.assert_array_equal(mask, brute)
    assert list(np.nonzero(brute)[0]) == EXPECTED  # the case is the one intended
    dead_only = np.asarray(resample.recycle_mask(cell.params, cell.since_fired, WINDOW, 0.0))
    np.testing.assert_array_equal(dead_only, _brute_mask(cell, WINDOW, 0.0))
    assert list(np.nonzero(dead_only)[0]) == [0, 5, 7]
    for thr in (0.3, 0.6):  # lower thresholds catch more pairs; still only the later atom
        np.testing.assert_array_equal(
            np.asarray(resample.recycle_mask(cell.params, cell.since_fired, WINDOW, thr)),
            _brute_mask(cell, WINDOW, thr))


def test_resample_cell_against_brute_force():
    cell, pool = _cell(), _pool()
    new = _resample(cell, pool, jax.random.PRNGKey(0), WINDOW, THR, WORST)
    mask = _brute_mask(cell, WINDOW, THR)
    live = ~mask

    # Untouched latents: parameters and both Adam moments bit-for-bit.
    for before, after in [(cell.params, new.params), (cell.opt.mu, new.opt.mu),
                          (cell.opt.nu, new.opt.nu)]:
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(b)[live], np.asarray(a)[live])
    # Recycled latents: zero Adam moments in every parameter.
    for moments in (new.opt.mu, new.opt.nu):
        for leaf in jax.tree.leaves(moments):
            assert np.all(np.asarray(leaf)[mask] == 0)
    assert int(new.opt.count) == int(cell.opt.count)

    # New atoms: unit residual directions of distinct worst-reconstructed pool samples.
    x = np.asarray(pool, np.float64)
    resid = x - _np_reconstruct(cell.params, x)
    err = (resid ** 2).sum(axis=1)
    worst = np.argsort(-err)[:WORST]
    dirs = resid[worst] / np.linalg.norm(resid[worst], axis=1, keepdims=True)
    dec = np.asarray(new.params.D_MxD, np.float64)
    picked = []
    for j in np.nonzero(mask)[0]:
        dist = np.abs(dirs - dec[j]).max(axis=1)
        assert dist.min() < 1e-4, f"latent {j} is not a worst-sample residual direction"
        picked.append(int(np.argmin(dist)))
    assert len(set(picked)) == len(picked)  # no repeats while the worst samples last
    np.testing.assert_allclose(np.linalg.norm(dec[mask], axis=1), 1.0, atol=1e-5)

    # Encoder rows: the direction times the mean live encoder-row norm; bias: the mean live bias.
    w_old, b_old = np.asarray(cell.params.W_enc_MxD, np.float64), np.asarray(cell.params.b_enc_M)
    enc_norm = np.linalg.norm(w_old[live], axis=1).mean()
    np.testing.assert_allclose(np.asarray(new.params.W_enc_MxD)[mask], dec[mask] * enc_norm,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.params.b_enc_M)[mask], b_old[live].mean(), rtol=1e-5)

    # Counters: recycled latents restart; the count grows by the number recycled.
    since = np.asarray(new.since_fired)
    assert np.all(since[mask] == 0)
    np.testing.assert_array_equal(since[live], np.asarray(cell.since_fired)[live])
    assert int(new.n_resampled) == 3 + len(EXPECTED)


def test_more_recycled_than_worst_samples_reuses_the_worst_only():
    cell, pool = _cell(), _pool()
    new = _resample(cell, pool, jax.random.PRNGKey(3), WINDOW, THR, 2)
    x = np.asarray(pool, np.float64)
    resid = x - _np_reconstruct(cell.params, x)
    worst = np.argsort(-(resid ** 2).sum(axis=1))[:2]
    dirs = resid[worst] / np.linalg.norm(resid[worst], axis=1, keepdims=True)
    dec = np.asarray(new.params.D_MxD, np.float64)[EXPECTED]
    which = [int(np.argmin(np.abs(dirs - row).max(axis=1))) for row in dec]
    assert all(np.abs(dirs[w] - row).max() < 1e-4 for w, row in zip(which, dec))
    assert sorted(which) == [0, 0, 1, 1]  # each of the 2 worst used twice


def test_nothing_qualifies_leaves_the_cell_bit_identical():
    # Atoms e_0..e_7 and (e_i - e_i+1): pairwise cosines are 0, +-0.5 or 0.71, all below 0.9.
    eye = np.eye(D, dtype=np.float32)
    dec = np.concatenate([eye, eye[: M - D] - eye[1: M - D + 1]])
    cell = _cell().replace(since_fired=jnp.full(M, WINDOW - 1, jnp.int32))
    cell = cell.replace(params=cell.params._replace(D_MxD=jnp.asarray(dec)))
    assert not _brute_mask(cell, WINDOW, THR).any()
    new = _resample(cell, _pool(), jax.random.PRNGKey(0), WINDOW, THR, WORST)
    for a, b in zip(jax.tree.leaves(cell), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_diverged_cell_is_not_resampled():
    cell = _cell().replace(diverged=jnp.asarray(True))
    new = _resample(cell, _pool(), jax.random.PRNGKey(0), WINDOW, THR, WORST)
    for a, b in zip(jax.tree.leaves(cell), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resample_grid_result_does_not_depend_on_a_cells_slot():
    """Three copies of one cell in one group are the same cell: they must resample alike
    (otherwise a cell trained inside a grid differs from the same cell trained alone)."""
    cell = _cell()
    group = jax.tree.map(lambda a: jnp.stack([a, a, a]), cell)
    state = grid.GridState((group,), jnp.asarray(250, jnp.int32), jax.random.PRNGKey(5))
    cfg = grid.TrainConfig(resample=resample.ResampleConfig(every=250, pool=P, worst=WORST,
                                                            dead_window=WINDOW, dedup_threshold=THR))
    group = group.replace(pool_x=jnp.stack([_pool()] * 3))
    state = state.replace(groups=(group,))
    out = resample.resample_grid(state, cfg.resample).groups[0]
    assert np.all(np.asarray(out.n_resampled) == 3 + len(EXPECTED))
    for leaf in jax.tree.leaves(out):
        leaf = np.asarray(leaf)
        np.testing.assert_array_equal(leaf[1], leaf[0])
        np.testing.assert_array_equal(leaf[2], leaf[0])


def test_fully_dead_cell_gets_latents_that_can_fire():
    """When every latent is dead there are no live encoder rows to take a norm from; the new
    latents must still be able to fire (a zero encoder row and zero bias give c = relu(0) = 0
    and zero gradient forever, so the cell could never recover)."""
    cell = _cell().replace(since_fired=jnp.full(M, WINDOW, jnp.int32))
    pool = _pool()
    new = _resample(cell, pool, jax.random.PRNGKey(0), WINDOW, THR, WORST)
    assert int(new.n_resampled) == 3 + M
    assert np.all(np.linalg.norm(np.asarray(new.params.W_enc_MxD), axis=1) > 0)
    assert np.asarray(sae.encode(new.params, pool) > 0).any(axis=0).all()


def test_encoder_scale_scales_only_the_new_encoder_rows():
    cell, pool = _cell(), _pool()
    key = jax.random.PRNGKey(0)
    mask = _brute_mask(cell, WINDOW, THR)
    assert mask.any()
    full = resample.resample_cell(cell, pool, key, WINDOW, THR, WORST)
    scaled = resample.resample_cell(cell, pool, key, WINDOW, THR, WORST, encoder_scale=0.2)
    np.testing.assert_allclose(np.asarray(scaled.params.W_enc_MxD)[mask],
                               0.2 * np.asarray(full.params.W_enc_MxD)[mask], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(scaled.params.W_enc_MxD)[~mask],
                                  np.asarray(full.params.W_enc_MxD)[~mask])
    np.testing.assert_array_equal(np.asarray(scaled.params.D_MxD), np.asarray(full.params.D_MxD))
