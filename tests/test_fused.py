"""The fused group step: its gradients equal autodiff's of `sae.loss`, in float32 to float
tolerance and in bfloat16 to bfloat16's; a cell in a fused grid equals the cell alone; training
through it matches the autodiff path. (Recovery in bfloat16: tests/test_grid.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import fused, grid, resample, sae
from sae_jax.errors import UsageError

C, B, D, M = 3, 48, 16, 40
ALPHAS = jnp.array([0.0, 0.1, 1.0])


@pytest.fixture(scope="module")
def group():
    """Three cells with non-zero biases and decoder rows of various norms."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    p = jax.vmap(lambda key: sae.init(key, D, M))(jax.random.split(k[0], C))
    return p._replace(b_enc_M=0.1 * jax.random.normal(k[1], (C, M)),
                      D_MxD=p.D_MxD * jax.random.uniform(k[2], (C, M, 1), minval=0.3, maxval=3.0))


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (B, D))
    return x, x[None] + 0.2 * jax.random.normal(k2, (C, B, D))


def _reference(params, x_in, target, conv):
    in_x, in_t = (0 if a.ndim == 3 else None for a in (x_in, target))
    f = jax.vmap(jax.value_and_grad(sae.loss, has_aux=True), in_axes=(0, in_x, 0, None, in_t))
    return f(params, x_in, ALPHAS, conv, target)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)


@pytest.mark.parametrize("conv", ["report", "sum"])
@pytest.mark.parametrize("inputs", ["shared", "per_cell", "per_cell_target"])
def test_float32_equals_autodiff(group, batch, conv, inputs):
    """per_cell: denoising (per-cell input, shared target); per_cell_target: a world axis (each
    cell's own batch is its input and its target, the default target)."""
    x, x_noisy = batch
    x_in = x if inputs == "shared" else x_noisy
    target = x_noisy if inputs == "per_cell_target" else x
    (ref_loss, ref_aux), ref_g = _reference(group, x_in, target, conv)
    (loss, aux), g = jax.jit(fused.group_loss_and_grad, static_argnums=(3, 5))(
        group, x_in, ALPHAS, conv, None if inputs == "per_cell_target" else x, "float32")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ("mse", "l1", "l0", "sq_err_B"):
        np.testing.assert_allclose(getattr(aux, name), getattr(ref_aux, name), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(aux.fired_M, ref_aux.fired_M)
    for name, a, b in zip(sae.SAEParams._fields[:3], g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))),
                                   err_msg=name)


def test_bfloat16_is_autodiff_to_bfloat16_precision(group, batch):
    """bfloat16 operands carry 8 significant bits: the loss to ~1e-3, gradients to ~1e-2."""
    x, _ = batch
    (ref_loss, _), ref_g = _reference(group, x, x, "report")
    (loss, aux), g = fused.group_loss_and_grad(group, x, ALPHAS, "report", None, "bfloat16")
    assert _rel_err(loss, ref_loss) < 3e-3
    for name, a, b in zip(sae.SAEParams._fields[:3], g, ref_g):
        assert _rel_err(a, b) < 3e-2, name
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(((loss, aux), g))
               if leaf.dtype != bool)


def test_bfloat16_input_equals_its_float32_values(group, batch):
    """An activation store in bfloat16 feeds the step as is: same result as its float32 values."""
    x = batch[0].astype(jnp.bfloat16)
    a = fused.group_loss_and_grad(group, x, ALPHAS, "report", None, "bfloat16")
    b = fused.group_loss_and_grad(group, x.astype(jnp.float32), ALPHAS, "report", None, "bfloat16")
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_bad_dtype(group, batch):
    with pytest.raises(ValueError, match="compute_dtype"):
        fused.group_loss_and_grad(group, batch[0], ALPHAS, compute_dtype="float16")
    with pytest.raises(UsageError, match="`compute_dtype` must be one of float32, bfloat16"):
        grid.TrainConfig(compute_dtype="float16").validate()


# ----------------------------------------------------------------------------- in the grid
SPEC = grid.GridSpec(l1_coeff=(0.01, 0.3), dict_sizes=(24, 32), seeds=(0, 1))
BASE = grid.TrainConfig(batch_size=64, lr=1e-2, l1_convention="sum", resample=resample.ResampleConfig(
    every=20, worst=8, dedup_threshold=0.9))


def _train(world, cfg, spec=SPEC, steps=60):
    state = grid.init_grid(jax.random.PRNGKey(3), spec, world.d, cfg)
    return grid.train(state, cfg, steps, world=world, chunk=steps, progress=False)


@pytest.mark.parametrize("cfg", [dataclasses.replace(BASE, fused_step=True),
                                 dataclasses.replace(BASE, compute_dtype="bfloat16")],
                         ids=["float32", "bfloat16"])
def test_cell_in_fused_grid_equals_cell_trained_alone(tiny_world, cfg):
    full = _train(tiny_world, cfg)
    for cell in (SPEC.cells()[1], SPEC.cells()[-1]):  # one cell of each size group
        alone = _train(tiny_world, cfg, grid.GridSpec((cell.l1_coeff,), (cell.dict_size,), (cell.seed,)))
        a = jax.tree.map(lambda x: x[cell.slot], full.groups[cell.group])
        b = jax.tree.map(lambda x: x[0], alone.groups[0])
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                       rtol=1e-5, atol=1e-6)


def test_fused_float32_training_tracks_autodiff(tiny_world):
    """60 steps with resampling: the fused float32 step ends where the autodiff step ends."""
    ref = _train(tiny_world, BASE)
    got = _train(tiny_world, dataclasses.replace(BASE, fused_step=True))
    for g_ref, g in zip(ref.groups, got.groups):
        np.testing.assert_array_equal(g.n_resampled, g_ref.n_resampled)
        np.testing.assert_allclose(sae.dictionary(g.params), sae.dictionary(g_ref.params),
                                   atol=2e-4)


def test_denoising_grid_runs_fused(tiny_world):
    """Per-cell noisy inputs (the denoising appendix) through the fused step equal autodiff."""
    spec = grid.GridSpec(l1_coeff=(0.1,), dict_sizes=(32,), noise=(0.0, 0.1))
    cfg = dataclasses.replace(grid.TrainConfig(batch_size=64, lr=3e-3), denoise=True)
    ref = _train(tiny_world, cfg, spec, steps=30)
    got = _train(tiny_world, dataclasses.replace(cfg, fused_step=True), spec, steps=30)
    np.testing.assert_allclose(got.groups[0].params.D_MxD, ref.groups[0].params.D_MxD, atol=1e-4)
