"""The decoder's unit-norm atoms on the sparse path's native kernels (one cell; vmap for a group).

    a_l = D_l / n_l,   n_l = s_l ||D_l / s_l|| + eps,   s_l = max_i |D_li|     (sae.unit_rows)

`unit_rows` computes it with its VJP by hand, dL/dD_l = g_l / n_l - (g_l . D_l) D_l / (n_l^2 |D_l|),
one native pass per row each way on the CPU. `decode_sq_err_unit` is `sparse.decode_sq_err` on
those atoms without writing them out: the codes are scaled, c_bj / n_{i_bj}, and the VJP's
scatter-add applies the unit-norm VJP to each row it finishes. Elsewhere both are the XLA
composition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax import native
from sae_jax.sparse import F32, _check_k, _dtype, decode_sq_err

Array = jax.Array
UNIT_EPS = 1e-8  # sae.unit_rows' eps


@jax.custom_vjp
def unit_rows(D_MxD: Array) -> Array:
    """sae.unit_rows (a = D / n, n = s ||D / s|| + eps per row, s = max |D_i|) with its VJP by
    hand, dL/dD = g / n - (g . D) / (n^2 (n - eps)) D for cotangent g (autodiff's, but 0 instead
    of NaN for the second term of a zero row): on the CPU's native kernels one pass per row each
    way, where XLA:CPU makes six over the dictionary (about 9 of the default TopK step's 115 ms)."""
    return _unit_rows_fwd(D_MxD)[0]


def _xla_unit_rows(w: Array) -> tuple[Array, Array]:
    s = jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    s = jnp.where(s > 0, s, 1.0)
    n = s * jnp.linalg.norm(w / s, axis=-1, keepdims=True) + UNIT_EPS
    return w / n, n


def _xla_unit_rows_vjp(w: Array, n: Array, g: Array) -> Array:
    norm = n - UNIT_EPS
    c = jnp.where(norm > 0, jnp.sum(g * w, axis=-1, keepdims=True) / (n * n) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return g / n - c * w


def _unit_rows_fwd(D_MxD):
    w = D_MxD.astype(F32)
    a, n = native.on_cpu(lambda w: native.unit_rows(w, UNIT_EPS), _xla_unit_rows)(w)
    return a.astype(D_MxD.dtype), (w, n)


def _unit_rows_bwd(res, g):
    w, n = res
    dw = native.on_cpu(lambda w, n, g: native.unit_rows_vjp(w, n, g, UNIT_EPS), _xla_unit_rows_vjp)(w, n, g.astype(F32))
    return (dw.astype(g.dtype),)


unit_rows.defvjp(_unit_rows_fwd, _unit_rows_bwd)


def decode_sq_err_unit(D_MxD: Array, vals_BxK: Array, idx_BxK: Array, target_BxD: Array,
                       compute_dtype: str = "float32") -> Array:
    """decode_sq_err(unit_rows(D), ...): TopK's per-sample error with unit-norm atoms. On the CPU's
    native kernels the atoms are never written out: the forward pass scales each atom's code by
    1/n (n = `unit_rows`' norm, one pass over D for the norms), x^_b = sum_j (c_bj / n_i) D_i, and
    the scatter-add of the VJP turns each dL/da_l into dL/dD_l (the unit-norm VJP) as it finishes
    it. The same values as the composition, to float rounding."""
    _check_k(vals_BxK.shape[-1], D_MxD.shape[0])
    return native.on_cpu(lambda *a: _sq_err_unit(*a, compute_dtype),
                         lambda D, v, i, t: decode_sq_err(unit_rows(D), v, i, t, compute_dtype), vals_BxK.size)(
        D_MxD, vals_BxK, idx_BxK, target_BxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sq_err_unit(D_MxD, vals_BxK, idx_BxK, target_BxD, compute_dtype):
    return _sq_err_unit_fwd(D_MxD, vals_BxK, idx_BxK, target_BxD, compute_dtype)[0]


def _sq_err_unit_fwd(D_MxD, vals_BxK, idx_BxK, target_BxD, compute_dtype):
    w = D_MxD.astype(F32)
    n = native.row_norms(w, UNIT_EPS)  # (M, 1)
    e, r, sq = native.decode_err(vals_BxK.astype(F32), w.astype(_dtype(compute_dtype)), idx_BxK,
                                 target_BxD.astype(F32), 1.0 / n[:, 0])
    return sq, (w, n, vals_BxK, idx_BxK, e, r, jnp.zeros((), D_MxD.dtype), jnp.zeros((), target_BxD.dtype))


def _sq_err_unit_bwd(compute_dtype, res, g_B):
    w, n, vals, idx, e, r, d_zero, target_zero = res
    s = 2.0 * g_B.astype(F32)[:, None]  # d sq_b / d x^_b = 2 e_b
    d_D = native.scatter(vals * s, e.astype(_dtype(compute_dtype)), idx, w.shape[0], unit=(w, n, UNIT_EPS))[0]
    return (d_D.astype(d_zero.dtype), (s * r).astype(vals.dtype), None, (-s * e).astype(target_zero.dtype))


_sq_err_unit.defvjp(_sq_err_unit_fwd, _sq_err_unit_bwd)
