"""Sparse codes and a sparse decoder for TopK and BatchTopK SAEs (one cell; vmap for a group).

TopK (Gao et al. 2024) keeps the k largest pre-activations of each sample; BatchTopK
(Bussmann et al. 2024) the k B largest of the whole batch. With k of m latents active, only the
encoder's forward needs every latent:

    pre_BxM = x W_e^T + b_e                         one dense GEMM
    (v, i)  = top-k of pre per sample (TopK) or over the batch (BatchTopK); c = ReLU(v)
    x^_b    = sum_j c_bj a_{i_bj}                    gather k atoms per sample (a = unit rows of D)

and the backward pass, by hand (`jax.custom_vjp`), touches only the selected rows:

    dL/dc_bj   = g_b . a_{i_bj}                      g = dL/dx^
    dL/da_l    = sum_{(b,j): i_bj = l} c_bj g_b      scatter-add
    dL/dpre_bj = dL/dc_bj [v_bj > 0]
    dL/dW_e,l  = sum_{(b,j): i_bj = l} dL/dpre_bj x_b, dL/db_e,l the same sum of dL/dpre_bj.

These equal autodiff of the dense formulation (c scattered into a (B, m) matrix of zeros,
x^ = c unit_rows(D)) to float tolerance (tests/test_sparse.py). A pre-activation that is
selected but negative gives a zero code and no gradient, as ReLU does.

XLA's CPU gather and scatter run fast only on whole rows, a batch of them at a time: every
kernel here loops over the k slots (a `fori_loop`, partly unrolled) and moves B rows per trip,
so the (B, k, d) array of gathered rows never exists. `compute_dtype` casts the GEMM's and the
gathered tables' operands (bfloat16: half the bytes moved); sums accumulate in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.errors import UsageError

Array = jax.Array
F32 = jnp.float32
COMPUTE_DTYPES = ("float32", "bfloat16")
UNROLL = 8  # slots per loop trip: measured fastest of 1-32 (benchmarks/grid_step.py --only topk)
P = "promise_in_bounds"


class BatchTopKCodes(NamedTuple):
    """The batch's k B largest activations as coordinates (COO)."""

    vals_N: Array  # ReLU of the selected pre-activations (float32)
    sample_N: Array  # int32: which sample
    latent_N: Array  # int32: which latent
    min_active: Array  # () the smallest selected positive activation (inf if none): what the
    #                    inference threshold is estimated from


def _dtype(compute_dtype: str):
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"`compute_dtype` must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}",
                         field="compute_dtype")
    return jnp.dtype(compute_dtype)


# ----------------------------------------------------------------------------- kernels
def _spmm(w_JxN: Array, table_SxD: Array, src_JxN: Array | None, dst_JxN: Array | None,
          n_out: int) -> Array:
    """out[dst_jn] += w_jn table[src_jn], summed over every slot j and entry n, in float32.

    src None: row n of the table (a table of N rows); dst None: row n of the output (N rows,
    then no scatter: an accumulation in place)."""
    (trips, n), d = w_JxN.shape, table_SxD.shape[-1]

    def body(j, acc):
        rows = table_SxD if src_JxN is None else jnp.take(table_SxD, src_JxN[j], axis=0, mode="clip")
        upd = w_JxN[j][:, None] * rows.astype(F32)
        if dst_JxN is None:
            return acc + upd
        return acc.at[dst_JxN[j]].add(upd, mode=P)
    init = jnp.zeros((n if dst_JxN is None else n_out, d), F32)
    return jax.lax.fori_loop(0, trips, body, init, unroll=min(UNROLL, trips))


def _sddmm(a_SxD: Array, a_JxN: Array | None, b_TxD: Array, b_JxN: Array | None) -> Array:
    """out[j, n] = a[a_jn] . b[b_jn] (index None: row n), in float32: (J, N)."""
    idx = a_JxN if a_JxN is not None else b_JxN
    rows = lambda t, i, j: t if i is None else jnp.take(t, i[j], axis=0, mode="clip")

    def body(carry, j):
        return carry, jnp.sum(rows(a_SxD, a_JxN, j).astype(F32) * rows(b_TxD, b_JxN, j).astype(F32), -1)
    return jax.lax.scan(body, None, jnp.arange(idx.shape[0]), unroll=min(UNROLL, idx.shape[0]))[1]


def _pre(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, dt) -> Array:
    """x W_e^T + b_e, operands in dt, float32 accumulation: (B, M)."""
    return jnp.einsum("bd,md->bm", x_BxD.astype(dt), W_enc_MxD.astype(dt),
                      preferred_element_type=F32) + b_enc_M


def _encoder_grads(W_enc_MxD: Array, x_BxD: Array, dpre_JxN: Array, latent_JxN: Array,
                   sample_JxN: Array | None, dt) -> tuple[Array, Array, Array]:
    """(dW_e, db_e, dx) from dL/dpre at the selected (sample, latent) pairs (sample None: the
    TopK layout, entry n of every slot is sample n)."""
    m = W_enc_MxD.shape[0]
    dW = _spmm(dpre_JxN, x_BxD.astype(dt), sample_JxN, latent_JxN, m)
    db = jnp.zeros((m,), F32).at[latent_JxN.reshape(-1)].add(dpre_JxN.reshape(-1), mode=P)
    if sample_JxN is None:
        dx = _spmm(dpre_JxN, W_enc_MxD.astype(dt), latent_JxN, None, x_BxD.shape[0])
    else:
        dx = _spmm(dpre_JxN, W_enc_MxD.astype(dt), latent_JxN, sample_JxN, x_BxD.shape[0])
    return dW.astype(W_enc_MxD.dtype), db.astype(W_enc_MxD.dtype), dx.astype(x_BxD.dtype)


# ----------------------------------------------------------------------------- TopK
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def topk_codes(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int,
               compute_dtype: str = "float32") -> tuple[Array, Array]:
    """(c_BxK, i_BxK): per sample the k largest pre = x W_e^T + b_e (descending), c = ReLU of
    them, i their latents (int32). The VJP scatters k rows per sample into dW_e, db_e."""
    pre = _pre(W_enc_MxD, b_enc_M, x_BxD, _dtype(compute_dtype))
    v, i = jax.lax.top_k(pre, k)
    return jnp.maximum(v, 0.0), i


def _topk_fwd(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    c, i = topk_codes(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return (c, i), (W_enc_MxD, x_BxD, c > 0, i)


def _topk_bwd(k, compute_dtype, res, cot):
    W, x, active_BxK, i_BxK = res
    dpre = jnp.where(active_BxK, cot[0], 0.0).astype(F32)
    return _encoder_grads(W, x, dpre.T, i_BxK.T, None, _dtype(compute_dtype))


topk_codes.defvjp(_topk_fwd, _topk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def decode(atoms_MxD: Array, vals_BxK: Array, idx_BxK: Array,
           compute_dtype: str = "float32") -> Array:
    """x^_b = sum_j c_bj a_{i_bj} (float32), with the sparse VJP of the module docstring; the
    atoms a are used as given (normalise them first: autodiff carries that VJP)."""
    return _spmm(vals_BxK.T.astype(F32), atoms_MxD.astype(_dtype(compute_dtype)), idx_BxK.T, None,
                 vals_BxK.shape[0])


def _decode_fwd(atoms_MxD, vals_BxK, idx_BxK, compute_dtype):
    return decode(atoms_MxD, vals_BxK, idx_BxK, compute_dtype), (atoms_MxD, vals_BxK, idx_BxK)


def _decode_bwd(compute_dtype, res, g_BxD):
    atoms, vals, idx = res
    dt = _dtype(compute_dtype)
    g_lo, atoms_lo = g_BxD.astype(dt), atoms.astype(dt)
    d_vals = _sddmm(g_lo, None, atoms_lo, idx.T).T
    d_atoms = _spmm(vals.T.astype(F32), g_lo, None, idx.T, atoms.shape[0])
    return d_atoms.astype(atoms.dtype), d_vals.astype(vals.dtype), None


decode.defvjp(_decode_fwd, _decode_bwd)


# ----------------------------------------------------------------------------- BatchTopK
def _coo_slots(a_N: Array, width: int) -> Array:
    """(J, width) view of a length-N array, padded with zeros to a multiple of width."""
    n = a_N.shape[0]
    return jnp.pad(a_N, (0, (-n) % width)).reshape(-1, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    pre = _pre(W_enc_MxD, b_enc_M, x_BxD, _dtype(compute_dtype))
    m = pre.shape[1]
    v, flat = jax.lax.top_k(pre.reshape(-1), k * x_BxD.shape[0])
    return jnp.maximum(v, 0.0), (flat // m).astype(jnp.int32), (flat % m).astype(jnp.int32)


def _batchtopk_fwd(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    out = _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return out, (W_enc_MxD, x_BxD, out[0] > 0, out[1], out[2])


def _batchtopk_bwd(k, compute_dtype, res, cot):
    W, x, active, sample, latent = res
    width = x.shape[0]
    dpre = jnp.where(active, cot[0], 0.0).astype(F32)
    return _encoder_grads(W, x, _coo_slots(dpre, width), _coo_slots(latent, width),
                          _coo_slots(sample, width), _dtype(compute_dtype))


_batchtopk.defvjp(_batchtopk_fwd, _batchtopk_bwd)


def batchtopk_codes(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int,
                    compute_dtype: str = "float32") -> BatchTopKCodes:
    """The N = k B largest entries of pre = x W_e^T + b_e over the whole batch (a sample may
    hold any number of them), as COO with c = ReLU(pre), in descending order of pre; and the
    smallest selected positive activation. Sparse VJP to W_e and b_e, as `topk_codes`."""
    vals, sample, latent = _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    min_active = jnp.min(jnp.where(vals > 0, jax.lax.stop_gradient(vals), jnp.inf))
    return BatchTopKCodes(vals, sample, latent, min_active)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def decode_coo(atoms_MxD: Array, vals_N: Array, sample_N: Array, latent_N: Array,
               batch: int, compute_dtype: str = "float32") -> Array:
    """x^_b = sum over entries n with sample_n = b of c_n a_{latent_n}: (batch, d) float32, with
    the same sparse VJP as `decode`."""
    w = lambda a: _coo_slots(a, batch)
    return _spmm(w(vals_N.astype(F32)), atoms_MxD.astype(_dtype(compute_dtype)), w(latent_N),
                 w(sample_N), batch)


def _decode_coo_fwd(atoms_MxD, vals_N, sample_N, latent_N, batch, compute_dtype):
    out = decode_coo(atoms_MxD, vals_N, sample_N, latent_N, batch, compute_dtype)
    return out, (atoms_MxD, vals_N, sample_N, latent_N)


def _decode_coo_bwd(batch, compute_dtype, res, g_BxD):
    atoms, vals, sample, latent = res
    dt = _dtype(compute_dtype)
    n = vals.shape[0]
    w = lambda a: _coo_slots(a, batch)
    g_lo, atoms_lo = g_BxD.astype(dt), atoms.astype(dt)
    d_vals = _sddmm(g_lo, w(sample), atoms_lo, w(latent)).reshape(-1)[:n]
    d_atoms = _spmm(w(vals.astype(F32)), g_lo, w(sample), w(latent), atoms.shape[0])
    return d_atoms.astype(atoms.dtype), d_vals.astype(vals.dtype), None, None


decode_coo.defvjp(_decode_coo_fwd, _decode_coo_bwd)
