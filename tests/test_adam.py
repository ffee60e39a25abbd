"""Adam's step with the divergence rule (sae_jax.adam): the native CPU kernels against optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax import adam, grid, native, sae, sparse

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels (CI runs on the CPU)")
B1, B2, EPS = 0.9, 0.999, 1e-8
TX = optax.scale_by_adam(B1, B2, EPS)


@pytest.fixture(autouse=True, scope="module")
def built():
    assert native.available(), native.status()


def _state(cells, seed=0, count=4):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    shapes = dict(W_enc_MxD=(cells, 37, 21), b_enc_M=(cells, 37), D_MxD=(cells, 37, 21))
    tree = lambda i, scale=1.0, f=lambda a: a: sae.SAEParams(**{
        n: f(scale * jax.random.normal(jax.random.fold_in(ks[i], j), s)) for j, (n, s) in enumerate(shapes.items())})
    params, grads, mu, nu = tree(0), tree(1), tree(2, 0.1), tree(3, 1e-3, jnp.abs)
    opt = optax.ScaleByAdamState(count=jnp.arange(cells, dtype=jnp.int32) + count, mu=mu, nu=nu)
    lr = jnp.linspace(1e-3, 3e-2, cells, dtype=jnp.float32)
    return params, grads, opt, lr


def _step(native_on, params, grads, opt, lr, ok, diverged):
    """One vmapped, jitted step over the cells, through the native kernels or optax."""
    def f(p, g, o, lr, ok, d):
        return adam.step(p, g, o, lr, ok, d, B1, B2, EPS)
    with sparse.kernels(native_on):
        fn = jax.jit(jax.vmap(f))
        assert ("sae_adam_apply" in fn.lower(params, grads, opt, lr, ok, diverged).as_text()) == native_on
        return jax.tree.map(np.asarray, fn(params, grads, opt, lr, ok, diverged))


def _assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_native_step_is_bit_identical_to_optax_per_cell():
    """Per-cell learning rates and step counts; parameters of rank 1 and 2 whose sizes are not
    multiples of the kernels' 16 lanes."""
    params, grads, opt, lr = _state(cells=5)
    flags = (jnp.ones(5, bool), jnp.zeros(5, bool))
    native_out, xla_out = (_step(on, params, grads, opt, lr, *flags) for on in (True, False))
    _assert_identical(native_out, xla_out)
    assert not native_out[2].any()
    # and it is Adam's step: the first cell against optax's update written out
    updates, _ = TX.update(jax.tree.map(lambda a: a[0], grads), jax.tree.map(lambda a: a[0], opt))
    want = jax.tree.map(lambda p, u: p[0] - lr[0] * u, params, updates)
    for got, w in zip(jax.tree.leaves(native_out[0]), jax.tree.leaves(want)):
        np.testing.assert_allclose(got[0], w, rtol=1e-6, atol=1e-9)


def test_large_parameters_split_over_blocks_and_threads_and_a_shared_learning_rate():
    """17 cells of a parameter larger than two of the kernels' blocks (with a tail), a learning rate
    and step count shared by every cell (unbatched under vmap), one cell's gradient NaN in its
    last block: the same as optax, cell by cell."""
    cells, n = 17, 2 * 16384 + 5
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    p, g, m = (jax.random.normal(k, (cells, n)) for k in ks[:3])
    v = jnp.abs(jax.random.normal(ks[3], (cells, n))) * 1e-3
    g = g.at[5, n - 2].set(jnp.nan)
    opt = optax.ScaleByAdamState(count=jnp.int32(7), mu=m, nu=v)

    def run(on):
        f = lambda p, g, o: adam.step(p, g, o, jnp.float32(1e-3), jnp.array(True), jnp.array(False), B1, B2, EPS)
        with sparse.kernels(on):
            fn = jax.jit(jax.vmap(f, in_axes=(0, 0, optax.ScaleByAdamState(None, 0, 0))))
            assert ("sae_adam_apply" in fn.lower(p, g, opt).as_text()) == on
            return jax.tree.map(np.asarray, fn(p, g, opt))
    native_out, xla_out = run(True), run(False)
    _assert_identical(native_out, xla_out)
    assert native_out[2].tolist() == [i == 5 for i in range(cells)]


@pytest.mark.parametrize("where", ["grad nan", "grad inf", "update overflows", "loss", "before"])
def test_a_non_finite_cell_keeps_its_state_and_the_others_step(where):
    """The divergence rule, cell by cell: a non-finite gradient anywhere, a parameter whose step
    overflows, a non-finite loss, or a cell already diverged keeps (p, m, v, count)."""
    params, grads, opt, lr = _state(cells=3)
    ok, diverged = jnp.ones(3, bool), jnp.zeros(3, bool)
    if where == "grad nan":
        grads = grads._replace(b_enc_M=grads.b_enc_M.at[1, 36].set(jnp.nan))
    elif where == "grad inf":
        grads = grads._replace(D_MxD=grads.D_MxD.at[1, 0, 0].set(jnp.inf))
    elif where == "update overflows":
        params = params._replace(W_enc_MxD=params.W_enc_MxD.at[1, 5, 20].set(-3.4e38))
        grads = grads._replace(W_enc_MxD=grads.W_enc_MxD.at[1, 5, 20].set(1.0))
        opt = opt._replace(mu=opt.mu._replace(W_enc_MxD=opt.mu.W_enc_MxD.at[1, 5, 20].set(1.0)))
        lr = lr.at[1].set(1e37)  # u > 0.1 there: p - lr u < -3.41e38
    elif where == "loss":
        ok = ok.at[1].set(False)
    else:
        diverged = diverged.at[1].set(True)
    native_out, xla_out = (_step(on, params, grads, opt, lr, ok, diverged) for on in (True, False))
    _assert_identical(native_out, xla_out)
    new_params, new_opt, new_div = native_out
    assert new_div.tolist() == [False, True, False]
    for before, after in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((new_params, new_opt))):
        np.testing.assert_array_equal(np.asarray(before)[1], after[1])  # kept
        assert not np.array_equal(np.asarray(before)[0], after[0])      # stepped


def test_a_grid_trains_to_the_same_state_through_the_native_step_or_optax():
    """A relu_l1 and a TopK group over 10 steps: the optimizer's path is the only difference, so
    any difference is XLA fusing the gradients differently around a custom call: last bits."""
    spec = grid.GridSpec((0.01, 0.1), (48,), archs=("relu_l1", "topk"), k=(4,))
    cfg = grid.TrainConfig(batch_size=32)
    state = grid.init_grid(jax.random.PRNGKey(0), spec, 16, cfg)
    xs = jax.random.normal(jax.random.PRNGKey(1), (10, 32, 16))
    outs = {}
    for on in (True, False):
        fits = adam._native_fits
        try:
            adam._native_fits = (lambda *a: fits(*a)) if on else (lambda *a: False)
            jax.clear_caches()  # traces are cached; the choice is made when tracing
            step = jax.jit(grid.run_batches_chunk, static_argnums=2)
            assert ("sae_adam_apply" in step.lower(state, xs, cfg).as_text()) == on
            outs[on] = step(state, xs, cfg)
        finally:
            adam._native_fits = fits
            jax.clear_caches()
    for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)


def test_other_states_and_dtypes_run_optax():
    """bfloat16 parameters (or any state but optax's Adam) take optax's path, which the kernels
    do not cover."""
    params, grads, opt, lr = _state(cells=2)
    to16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    opt16 = opt._replace(mu=to16(opt.mu), nu=to16(opt.nu))
    f = jax.jit(jax.vmap(lambda p, g, o, lr: adam.step(p, g, o, lr, jnp.array(True), jnp.array(False),
                                                       B1, B2, EPS)))
    assert "sae_adam" not in f.lower(to16(params), to16(grads), opt16, lr).as_text()


def test_mismatched_shapes_are_an_error_not_a_crash():
    coef = jnp.ones(native.ADAM_COEFS)
    with pytest.raises(Exception, match="sae_adam_check: shapes"):
        jax.block_until_ready(native.adam_check(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((4, 3)),
                                                jnp.ones((4, 3)), coef))
    with pytest.raises(Exception, match="sae_adam_apply: shapes"):
        jax.block_until_ready(native.adam_apply(jnp.ones(5), jnp.ones(5), jnp.ones(5), jnp.ones(5),
                                                jnp.ones(3), jnp.zeros(1)))
