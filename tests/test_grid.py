"""The grid trainer: a cell in a grid equals the cell alone, chunking and determinism, fired
counters, divergence isolation, padding, validation, and recovery of a small world."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import grid, metrics, resample, sae, toy
from sae_jax.errors import UsageError

KEY = jax.random.PRNGKey(7)
STEPS = 100
# sum convention and lr 1e-2 so that, within 100 steps, latents die and get resampled.
SPEC = grid.GridSpec(l1_coeff=(0.01, 0.1, 0.3), dict_sizes=(24, 32), seeds=(0, 1))
OFF = grid.TrainConfig(batch_size=64, lr=1e-2, l1_convention="sum")
ON = dataclasses.replace(OFF, resample=resample.ResampleConfig(every=20, worst=8, dedup_threshold=0.9))


def _train(world, spec=SPEC, cfg=OFF, steps=STEPS, chunk=STEPS, pad=1, edit=None, key=KEY):
    state = grid.init_grid(key, spec, world.d, cfg, pad_multiple=pad)
    if edit is not None:
        state = edit(state)
    return grid.train(state, cfg, steps, world=world, chunk=chunk, progress=False)


@pytest.fixture(scope="module")
def baseline(tiny_world):
    """The full grid trained once per configuration, shared by the tests below."""
    return {"off": _train(tiny_world, cfg=OFF), "on": _train(tiny_world, cfg=ON)}


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _cell_view(state, cell):
    return jax.tree.map(lambda a: a[cell.slot], state.groups[cell.group])


# ----------------------------------------------------------------------------- spec
def test_cells_are_size_major_then_l1_then_seed():
    cells = SPEC.cells()
    assert len(cells) == 12
    assert [(c.dict_size, c.l1_coeff, c.seed) for c in cells[:6]] == [
        (24, 0.01, 0), (24, 0.01, 1), (24, 0.1, 0), (24, 0.1, 1), (24, 0.3, 0), (24, 0.3, 1)]
    assert [c.index for c in cells] == list(range(12))
    assert [(c.group, c.slot) for c in cells[6:8]] == [(1, 0), (1, 1)]
    spec = grid.GridSpec.from_ratios([0.1], [0.5, 1, 2.25], features=64, seeds=2)
    assert spec.dict_sizes == (32, 64, 144) and spec.seeds == (0, 1)
    assert [c.ratio for c in spec.cells()][::2] == [0.5, 1.0, 2.25]


@pytest.mark.parametrize("make", [
    lambda: grid.GridSpec(l1_coeff=(-0.1,), dict_sizes=(8,)),
    lambda: grid.GridSpec(l1_coeff=(float("nan"),), dict_sizes=(8,)),
    lambda: grid.GridSpec(l1_coeff=(float("inf"),), dict_sizes=(8,)),
    lambda: grid.GridSpec(l1_coeff=(), dict_sizes=(8,)),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=()),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(0,)),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(8, 8)),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(8,), seeds=()),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(8,), seeds=(0, 0)),
    lambda: grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(8,), noise=(-1.0,)),
    lambda: grid.GridSpec.from_ratios([0.1], [0.0], features=64),
    lambda: grid.GridSpec.from_ratios([0.1], [-1.0], features=64),
    lambda: grid.GridSpec.from_ratios([0.1], [float("nan")], features=64),
    lambda: grid.GridSpec.from_ratios([0.1], [float("inf")], features=64),
    lambda: grid.GridSpec.from_ratios([0.1], [1.0, 1.001], features=64),  # same size twice
    lambda: grid.GridSpec.from_ratios([0.1], [1.0], features=64, seeds=0),
])
def test_bad_grid_spec_raises_usage_error(make):
    with pytest.raises(UsageError):
        make().validate()


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("b1", 1.0), ("b2", -0.1),
    ("l1_convention", "mean"), ("dead_window", 0), ("l1_warmup", -1),
    ("resample", resample.ResampleConfig(dedup_threshold=1.0)),
    ("resample", resample.ResampleConfig(every=-5)),
])
def test_bad_train_config_raises_usage_error(field, value):
    cfg = dataclasses.replace(OFF, **{field: value})
    with pytest.raises(UsageError) as e:
        cfg.validate()
    assert e.value.field is not None and f"`{e.value.field}`" in str(e.value)  # names its field
    with pytest.raises(UsageError):
        grid.init_grid(KEY, SPEC, 16, cfg)


def test_resample_pool_must_fit_the_period_and_worst_the_pool():
    assert ON.validate().resample.pool_size == 20  # default: one row per step of the period
    with pytest.raises(UsageError, match="resample_pool") as e:
        dataclasses.replace(ON.resample, pool=21).validate()
    assert e.value.field == "resample_pool"
    with pytest.raises(UsageError, match="resample_worst"):
        dataclasses.replace(ON.resample, pool=10, worst=11).validate()


def test_pool_row_t_is_the_worst_reconstructed_input_of_step_t(tiny_world):
    """The resampling pool costs no extra sampling: step t writes the batch's worst-reconstructed
    input (under the parameters before the step) to row t mod K, per cell."""
    cfg = dataclasses.replace(ON, resample=dataclasses.replace(ON.resample, every=50))  # none in 7 steps
    state = grid.init_grid(KEY, SPEC, tiny_world.d, cfg)
    for t in range(7):
        key = jax.random.fold_in(state.data_key, state.step)
        x, _ = grid.toy_batch(tiny_world, key, cfg.batch_size)
        before = state
        state, _ = grid.run_toy_chunk(state, tiny_world, cfg, 1)
        for g_before, g_after in zip(before.groups, state.groups):
            for c in range(g_before.valid.shape[0]):
                p = jax.tree.map(lambda a: a[c], g_before.params)
                err = np.sum(np.square(np.asarray(x - sae.decode(p, sae.encode(p, x)))), axis=1)
                np.testing.assert_array_equal(np.asarray(g_after.pool_x[c, t]),
                                              np.asarray(x[np.argmax(err)]))
    assert not np.asarray(state.groups[0].pool_x[:, 7:]).any()  # rows not yet written


def test_pool_is_a_placeholder_row_when_resampling_is_off(tiny_world):
    state = grid.init_grid(KEY, SPEC, tiny_world.d, OFF)
    assert state.groups[0].pool_x.shape == (6, 1, tiny_world.d)


def test_bad_train_call_raises(tiny_world):
    state = grid.init_grid(KEY, SPEC, tiny_world.d, OFF)
    with pytest.raises(UsageError):
        grid.train(state, OFF, 0, world=tiny_world, progress=False)
    with pytest.raises(UsageError):
        grid.train(state, OFF, 10, progress=False)


# ----------------------------------------------------------------------------- grid == cell alone
def test_init_depends_on_size_and_seed_only():
    state = grid.init_grid(KEY, SPEC, 16, OFF)
    cells = SPEC.cells()
    p = lambda i: grid.cell_params(state, cells[i])
    _assert_trees_equal(p(0), p(2))  # same size and seed, other alpha: same init
    assert not np.allclose(p(0).D_MxD, p(1).D_MxD)  # other seed: other init
    assert state.groups[0].params.D_MxD.shape == (6, 24, 16)  # no padding to the largest size
    assert state.groups[1].params.D_MxD.shape == (6, 32, 16)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_cell_in_grid_equals_cell_trained_alone(tiny_world, baseline, mode):
    cfg = OFF if mode == "off" else ON
    full = baseline[mode]
    if mode == "on":  # the case must exercise resampling, in cells beyond slot 0
        resampled = [c for c in SPEC.cells() if int(grid.cell_field(full, c, "n_resampled")) > 0]
        assert len({c.slot for c in resampled}) >= 3, "no resampling happened: weak test"
    for cell in SPEC.cells():
        alone_spec = grid.GridSpec(l1_coeff=(cell.l1_coeff,), dict_sizes=(cell.dict_size,), seeds=(cell.seed,))
        alone = _train(tiny_world, alone_spec, cfg)
        a, b = _cell_view(full, cell), alone.groups[0]
        b = jax.tree.map(lambda x: x[0], b)
        msg = f"cell {cell} (slot {cell.slot})"
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5, err_msg=msg)
        np.testing.assert_array_equal(np.asarray(a.since_fired), np.asarray(b.since_fired), err_msg=msg)
        assert int(a.n_resampled) == int(b.n_resampled), msg


def test_chunking_does_not_change_the_result(tiny_world, baseline):
    chunked = _train(tiny_world, cfg=ON, chunk=STEPS // 2)
    assert int(chunked.step) == STEPS
    _assert_trees_equal(chunked.groups, baseline["on"].groups)


def test_same_key_same_result_other_key_other_result(tiny_world, baseline):
    again = _train(tiny_world, cfg=ON)
    _assert_trees_equal(again, baseline["on"])
    other = _train(tiny_world, cfg=ON, key=jax.random.PRNGKey(8))
    assert not np.allclose(other.groups[0].params.D_MxD, again.groups[0].params.D_MxD)


# ----------------------------------------------------------------------------- fired counters
def test_since_fired_and_dead_count_match_brute_force(tiny_world, baseline):
    """Counters after 100 one-step chunks against firing recomputed on the exact batches
    (key fold_in(data_key, step)) with the parameters each step saw."""
    window = 10
    state = grid.init_grid(KEY, SPEC, tiny_world.d, OFF)
    history = []  # per step, per group: (C, M) fired on that step's batch
    fired_fn = jax.jit(jax.vmap(lambda p, x: jnp.any(sae.encode(p, x) > 0, axis=0), (0, None)))
    for t in range(STEPS):
        x, _ = grid.toy_batch(tiny_world, jax.random.fold_in(state.data_key, t), OFF.batch_size)
        history.append([np.asarray(fired_fn(g.params, x)) for g in state.groups])
        state, _ = grid.run_toy_chunk(state, tiny_world, OFF, 1)
    # One-step chunks end where one 100-step chunk does.
    _assert_trees_equal(state, baseline["off"])
    n_dead = 0
    for g, group in enumerate(state.groups):
        fired_TxCxM = np.stack([h[g] for h in history])
        ever = fired_TxCxM.any(axis=0)
        last = STEPS - 1 - np.argmax(fired_TxCxM[::-1], axis=0)
        brute_since = np.where(ever, STEPS - 1 - last, STEPS)
        np.testing.assert_array_equal(np.asarray(group.since_fired), brute_since)
        brute_dead = (~fired_TxCxM[-window:].any(axis=0)).sum(axis=-1)
        np.testing.assert_array_equal(np.asarray(metrics.dead_latents(group.since_fired, window)),
                                      brute_dead)
        n_dead += brute_dead.sum()
        assert (brute_since == 0).any() and ((brute_since > 0) & (brute_since < window)).any()
    assert n_dead > 0  # some latents are dead: the count is not trivially zero


# ----------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("full_check", [True, False])
def test_diverged_cell_is_isolated(tiny_world, baseline, full_check):
    """A cell whose loss overflows is flagged, keeps its last finite parameters, and leaves
    every other cell as in the grid without it (with either divergence check)."""
    cfg = dataclasses.replace(OFF, full_finite_check=full_check)
    bad = SPEC.cells()[9]  # group 1, slot 3

    def blow_up(state):
        g = state.groups[bad.group]
        w = g.params.W_enc_MxD
        g = g.replace(params=g.params._replace(W_enc_MxD=w.at[bad.slot].multiply(1e25)))
        return state.replace(groups=tuple(g if i == bad.group else h
                                          for i, h in enumerate(state.groups)))

    start = blow_up(grid.init_grid(KEY, SPEC, tiny_world.d, cfg))
    state = _train(tiny_world, cfg=cfg, edit=blow_up)
    for cell in SPEC.cells():
        assert bool(grid.cell_field(state, cell, "diverged")) == (cell == bad), cell
        view = _cell_view(state, cell)
        if cell == bad:
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(view))
            _assert_trees_equal(view.params, _cell_view(start, cell).params)  # frozen
        else:
            _assert_trees_close(view, _cell_view(baseline["off"], cell), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- padding
def test_padding_cells_are_inert_and_change_nothing(tiny_world, baseline):
    state = _train(tiny_world, pad=4)
    init = grid.init_grid(KEY, SPEC, tiny_world.d, OFF, pad_multiple=4)
    for g, group in enumerate(state.groups):
        np.testing.assert_array_equal(np.asarray(group.valid), [True] * 6 + [False] * 2)
        np.testing.assert_array_equal(np.asarray(group.lr)[6:], 0.0)
        pad = jax.tree.map(lambda a: a[6:], group)
        assert not np.asarray(pad.diverged).any()
        _assert_trees_equal(pad.params, jax.tree.map(lambda a: a[6:], init.groups[g].params))
        real = jax.tree.map(lambda a: a[:6], group)
        _assert_trees_close(real, baseline["off"].groups[g], rtol=1e-5, atol=1e-6)
    _assert_trees_equal(grid.unpad(state, SPEC).groups,
                        tuple(jax.tree.map(lambda a: a[:6], g) for g in state.groups))


def test_a_device_holds_a_lone_cell_only_of_a_one_cell_group():
    """On n > 1 devices a group of several cells gets at least 2 per device (XLA compiles one
    vmapped cell without its cell axis, which rounds differently); padding twice adds nothing."""
    assert [grid.padded_size(n, n, 4) for n in (1, 2, 3, 4, 5, 13)] == [4, 8, 8, 8, 8, 16]
    assert [grid.padded_size(n, n, 1) for n in (1, 2, 3)] == [1, 2, 3]
    state = grid.init_grid(KEY, grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(8, 16), seeds=(0, 1, 2)), 16)
    state = state.replace(groups=(state.groups[0], jax.tree.map(lambda a: a[:1], state.groups[1])))
    once = grid.pad(state, 4)
    assert [g.valid.shape[0] for g in once.groups] == [8, 4]
    assert [int(np.sum(g.valid)) for g in once.groups] == [3, 1]
    assert [g.valid.shape[0] for g in grid.pad(once, 4).groups] == [8, 4]


# ----------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_small_world_recovered_to_mmcs_095(dtype):
    """d = 32, h = 64, k = 3 at ratio 1 with resampling: MMCS >= 0.95 after 2,000 steps, in float32
    (autodiff) and with the bfloat16 fused step (how fast is benchmarks/recovery_race.py's
    business, not a test's)."""
    world = toy.make_world(jax.random.PRNGKey(0), toy.ToyConfig(d=32, features=64, mean_active=3))
    spec = grid.GridSpec.from_ratios(l1_coeff=(0.1, 0.3, 1.0), ratios=(1,), features=64)
    cfg = grid.TrainConfig(batch_size=128, lr=3e-3, b2=0.99, compute_dtype=dtype,
                           resample=resample.ResampleConfig(every=250, worst=16, dedup_threshold=0.9))
    state = grid.train(grid.init_grid(jax.random.PRNGKey(0), spec, 32, cfg), cfg, 2000,
                       world=world, chunk=500, progress=False)
    scores = [metrics.mmcs(sae.dictionary(grid.cell_params(state, c)), world.features_HxD)
              for c in spec.cells()]
    assert max(scores) >= 0.95, scores
    # Before training the same dictionaries are far from the features.
    start = grid.init_grid(jax.random.PRNGKey(0), spec, 32, cfg)
    assert metrics.mmcs(sae.dictionary(grid.cell_params(start, spec.cells()[0])),
                        world.features_HxD) < 0.6


# ----------------------------------------------------------------------------- schedules
def test_lr_and_alpha_schedules_match_their_closed_forms():
    """lr multiplier = min(1, (t+1)/W) * (1 + cos(pi min(t/T, 1))) / 2; alpha multiplier =
    min(1, (t+1)/L)."""
    W, T, L = 10, 200, 50
    cfg = dataclasses.replace(OFF, lr_warmup=W, lr_decay_steps=T, l1_warmup=L)
    for t in (0, 1, 9, 10, 49, 50, 100, 199, 200, 350):
        lr_mult, l1_mult = grid._schedules(jnp.int32(t), cfg)
        want_lr = min(1.0, (t + 1) / W) * 0.5 * (1 + np.cos(np.pi * min(t / T, 1.0)))
        assert float(lr_mult) == pytest.approx(want_lr, abs=1e-6), t
        assert float(l1_mult) == pytest.approx(min(1.0, (t + 1) / L), abs=1e-7), t
    assert [float(m) for m in grid._schedules(jnp.int32(123), OFF)] == [1.0, 1.0]


# ----------------------------------------------------------------------------- denoising
def test_cell_update_with_noise_trains_on_noisy_input_against_the_clean_target(tiny_world):
    """One step = Adam on grad of sae.loss(params, x + noise * eps, alpha, target x)."""
    spec = grid.GridSpec(l1_coeff=(0.3,), dict_sizes=(24,), noise=(0.0, 0.2))
    cfg = dataclasses.replace(OFF, denoise=True)
    state = grid.init_grid(KEY, spec, tiny_world.d, cfg)
    x, eps = grid.toy_batch(tiny_world, jax.random.PRNGKey(5), cfg.batch_size, denoise=True)
    new, _ = grid.train_step(state, x, cfg, eps)
    for c in spec.cells():
        p0 = grid.cell_params(state, c)
        grads = jax.grad(sae.loss, has_aux=True)(p0, x + c.noise * eps, 0.3 * 1.0, cfg.l1_convention, x)[0]
        updates, _ = cfg.adam().update(grads, cfg.adam().init(p0))
        want = jax.tree.map(lambda p, u: p - cfg.lr * u, p0, updates)
        got = grid.cell_params(new, c)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # the noisy cell moved differently from the clean one
    a, b = (grid.cell_params(new, c).D_MxD for c in spec.cells())
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_noise_free_cell_of_a_denoising_grid_equals_the_plain_grid(tiny_world):
    """The appendix grid's noise-0 column is the plain autoencoder (same batches, same init)."""
    spec_dn = grid.GridSpec(l1_coeff=(0.1, 1.0), dict_sizes=(32,), noise=(0.0, 0.1))
    spec = grid.GridSpec(l1_coeff=(0.1, 1.0), dict_sizes=(32,))
    dn = _train(tiny_world, spec_dn, dataclasses.replace(OFF, denoise=True), 60)
    plain = _train(tiny_world, spec, OFF, 60)
    by_alpha = {c.l1_coeff: c for c in spec.cells()}
    for c in spec_dn.cells():
        if c.noise == 0:
            np.testing.assert_allclose(np.asarray(grid.cell_params(dn, c).D_MxD),  # (vmap width
                                       np.asarray(grid.cell_params(plain, by_alpha[c.l1_coeff]).D_MxD),
                                       rtol=1e-4, atol=1e-5)  # changes the fusion's last bits)
