"""AuxK's three exact forms: none when no latent is dead, gathered over the dead latents alone
(with the sparse decoder), and the dense form; the grid picks one per step, and each gives the
dense form's step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import archs, grid, sae

KEY = jax.random.PRNGKey(7)


def _params(rng, m, d, theta=None):
    p = sae.SAEParams(jnp.asarray(rng.standard_normal((m, d)), jnp.float32),
                      jnp.asarray(rng.standard_normal(m) * 0.1, jnp.float32),
                      jnp.asarray(rng.standard_normal((m, d)), jnp.float32),
                      b_dec_D=jnp.asarray(rng.standard_normal(d), jnp.float32))
    return p if theta is None else sae.with_threshold(p, jnp.full((m,), np.log(theta), jnp.float32))


@pytest.mark.parametrize("n_dead,k_aux,slots", [(1, 3, 8), (5, 3, 8), (8, 3, 8), (6, 8, 8), (4, 2, 40)])
def test_gathered_aux_k_equals_the_dense_form_when_its_slots_hold_every_dead_latent(rng, n_dead, k_aux, slots):
    """Value and every gradient (the decoder bias's included), dead latents scattered over the
    dictionary, k_aux below, at and above the number of dead latents."""
    m, d = 40, 6
    p = _params(rng, m, d)
    x = jnp.asarray(rng.standard_normal((64, d)) + 1.0, jnp.float32)
    resid = jnp.asarray(rng.standard_normal((64, d)), jnp.float32)
    dead = jnp.zeros(m, bool).at[rng.choice(m, n_dead, replace=False)].set(True)
    dense = lambda q: archs.aux_k_loss(q, archs.pre_acts(q, x), resid, dead, k_aux)  # noqa: E731
    gathered = lambda q: archs.aux_k_loss_gathered(q, x, resid, dead, k_aux, slots)  # noqa: E731
    assert float(dense(p)) > 0
    np.testing.assert_allclose(gathered(p), dense(p), rtol=1e-5)
    for field, a, b in zip(sae.SAEParams._fields, jax.grad(gathered)(p), jax.grad(dense)(p)):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=field)
    assert float(archs.aux_k_loss_gathered(p, x, resid, jnp.zeros(m, bool), k_aux, slots)) == 0.0


def test_aux_forms_by_the_number_of_dead_latents():
    """The records with AuxK: none, gathered up to S = min(m, k_aux), then dense where S < m;
    one form where AuxK is off (relu_l1, a zero coefficient) or its form is given."""
    opts = grid.TrainConfig().arch_options
    topk = archs.get("topk")
    forms = topk.aux_forms(opts, 384, 128)  # k_aux = d / 2 = 64
    assert [n for n, _ in forms] == [0, 64, 384]
    assert [(o.aux_k_coeff, o.aux_slots) for _, o in forms] == [(0.0, 0), (None, 64), (None, 0)]
    assert [n for n, _ in topk.aux_forms(opts, 50, 128)] == [0, 50]
    assert [n for n, _ in topk.aux_forms(opts._replace(aux_k=10), 384, 128)] == [0, 10, 384]
    assert archs.get("relu_l1").aux_forms(opts, 384, 128) == ((384, opts),)
    off = opts._replace(aux_k_coeff=0.0)
    assert topk.aux_forms(off, 384, 128) == ((384, off),)
    assert archs.uses_sparse(archs.Arch("topk", 4), 384, forms[1][1])  # gathered AuxK keeps it


@pytest.mark.parametrize("sparse", ["auto", "off"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_grid_step_in_the_form_it_picks_equals_the_dense_aux_k_step(rng, tiny_world, arch, n_dead, sparse):
    """A group of two cells (d 16: k_aux 8, S 8 of m 24), one with n_dead dead latents, so the
    step takes no AuxK (0), the gathered form (3; beside the sparse decoder with `sparse` auto, the
    dense codes with off) or the dense form (20):
    each equals the dense AuxK step by autodiff, parameters (thresholds included) and counters,
    where AuxK moves the parameters (the step without it differs)."""
    spec = grid.GridSpec((), (24,), seeds=(0, 1), archs=(arch,), k=(3,))
    cfg = grid.TrainConfig(batch_size=64, lr=3e-3, sparse_decoder=sparse)
    state = grid.init_grid(KEY, spec, 16, cfg)
    group = state.groups[0]
    since = np.zeros(group.since_fired.shape, np.int32)
    since[1, rng.choice(24, n_dead, replace=False)] = cfg.dead_window
    group = group.replace(since_fired=jnp.asarray(since))
    x = grid.toy_batch(tiny_world, jax.random.PRNGKey(2), 64)[0]
    args = (group, x, None, jnp.float32(1), jnp.float32(1), cfg, jnp.int32(5))
    picked, _ = jax.jit(grid.group_update, static_argnums=5)(*args[:5], cfg, args[6])
    dense = functools.partial(grid.cell_update, opts=cfg.arch_options._replace(sparse="off"))
    ref, _ = jax.jit(jax.vmap(dense, in_axes=(0, None, None, None, None, None, None)), static_argnums=5)(
        *args[:5], cfg, args[6])
    for a, b in zip(jax.tree.leaves(picked.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(picked.since_fired), np.asarray(ref.since_fired))
    off = functools.partial(grid.cell_update, opts=cfg.arch_options._replace(aux_k_coeff=0.0, sparse="off"))
    no_aux, _ = jax.vmap(off, in_axes=(0, None, None, None, None, None, None))(*args)
    moved = np.abs(np.asarray(no_aux.params.W_enc_MxD[1]) - np.asarray(ref.params.W_enc_MxD[1])).max()
    assert (moved > 1e-6) == (n_dead > 0)
