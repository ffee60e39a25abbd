"""BatchTopK's sparse codes and decoder (one cell; vmap for a group), on the kernels of
`sae_jax.sparse`, in two layouts.

BatchTopK (Bussmann et al. 2024) keeps the N = k B largest pre-activations of the whole batch, so
a sample holds any number of them. As N (value, sample, latent) triples (COO):

    x^_b       = sum over entries n with sample_n = b of c_n a_{latent_n}
    dL/dc_n    = g_{sample_n} . a_{latent_n}
    dL/da_l    = sum over entries with latent_n = l of c_n g_{sample_n}

with the encoder's VJP as `sparse.topk_codes`'.

Training uses the row layout (`batchtopk_rows`, `decode_rows`): sample b's c_b entries fill
ceil(c_b / J) rows of J slots (R = ceil(N / J) + B rows hold any batch; empty slots have code 0),
each row r tagged with its sample s_r, so that TopK's row kernels run unchanged on it:

    y_r   = sum_j c_rj a_{i_rj}              (TopK's gather-sum, per row)
    x^_b  = sum over rows r with s_r = b of y_r
    dL/dc_rj = g_{s_r} . a_{i_rj},  dL/da_l = sum over (r, j) with i_rj = l of c_rj g_{s_r}.

On the CPU the selection and the layout are one native kernel (`native.batch_topk`) and the rest
are the native row kernels; elsewhere XLA builds the same layout from lax.top_k. The COO
functions run through XLA's kernels on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax import native
from sae_jax.sparse import (
    F32,
    _check_k,
    _cpu,
    _dots,
    _dtype,
    _encoder_grads,
    _gather_sum,
    _gemm,
    _per_cell,
    _row_scatter,
    _scatter_sum,
)

Array = jax.Array


class BatchTopKCodes(NamedTuple):
    """The batch's k B largest activations as coordinates (COO)."""

    vals_N: Array  # ReLU of the selected pre-activations (float32)
    sample_N: Array  # int32: which sample
    latent_N: Array  # int32: which latent
    min_active: Array  # () the smallest selected positive activation (inf if none): what the
    #                    inference threshold is estimated from


def _pre(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, dt) -> Array:
    """x W_e^T + b_e, operands in dt, float32 accumulation: (B, M). Once per cell under vmap:
    the batched dot wrote (B, C, M) and then transposed all of it to (C, B, M) for top_k."""
    def gemm(w, b, x):
        return _gemm(x, w, dt) + b
    return _per_cell(gemm)(W_enc_MxD, b_enc_M, x_BxD)


def _coo_rows(a_N: Array, rows: int) -> Array:
    """(rows, J) view of a length-N array, padded with zeros (weight 0, index 0) to rows * J."""
    return jnp.pad(a_N, (0, (-a_N.shape[0]) % rows)).reshape(rows, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    _check_k(k, W_enc_MxD.shape[0])
    pre = _pre(W_enc_MxD, b_enc_M, x_BxD, _dtype(compute_dtype))
    m = pre.shape[1]
    v, flat = jax.lax.optimization_barrier(jax.lax.top_k(pre.reshape(-1), k * x_BxD.shape[0]))
    return jnp.maximum(v, 0.0), (flat // m).astype(jnp.int32), (flat % m).astype(jnp.int32)


def _batchtopk_fwd(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    out = _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return out, (W_enc_MxD, x_BxD, out[0] > 0, out[1], out[2])


def _batchtopk_bwd(k, compute_dtype, res, cot):
    W, x, active, sample, latent = res
    rows = lambda a: _coo_rows(a, x.shape[0])
    dpre = jnp.where(active, cot[0], 0.0).astype(F32)
    return _encoder_grads(W, x, rows(dpre), rows(latent), rows(sample))


_batchtopk.defvjp(_batchtopk_fwd, _batchtopk_bwd)


def batchtopk_codes(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int,
                    compute_dtype: str = "float32") -> BatchTopKCodes:
    """The N = k B largest entries of pre = x W_e^T + b_e over the whole batch (a sample may
    hold any number of them), as COO with c = ReLU(pre), in descending order of pre; and the
    smallest selected positive activation. Sparse VJP to W_e and b_e, as `topk_codes`."""
    vals, sample, latent = _batchtopk(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    min_active = jnp.min(jnp.where(vals > 0, jax.lax.stop_gradient(vals), jnp.inf))
    return BatchTopKCodes(vals, sample, latent, min_active)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_coo(atoms_MxD: Array, vals_N: Array, sample_N: Array, latent_N: Array,
               batch: int) -> Array:
    """x^_b = sum over entries n with sample_n = b of c_n a_{latent_n}: (batch, d), with the
    same sparse VJP as `decode`."""
    rows = lambda a: _coo_rows(a, batch)
    return _scatter_sum(rows(vals_N), atoms_MxD, rows(latent_N), rows(sample_N), batch)


def _decode_coo_fwd(atoms_MxD, vals_N, sample_N, latent_N, batch):
    out = decode_coo(atoms_MxD, vals_N, sample_N, latent_N, batch)
    return out, (atoms_MxD, vals_N, sample_N, latent_N)


def _decode_coo_bwd(batch, res, g_BxD):
    atoms, vals, sample, latent = res
    rows = lambda a: _coo_rows(a, batch)
    d_vals = _dots(g_BxD, rows(sample), atoms, rows(latent)).reshape(-1)[:vals.shape[0]]
    d_atoms = _scatter_sum(rows(vals), g_BxD, rows(sample), rows(latent), atoms.shape[0])
    return d_atoms.astype(atoms.dtype), d_vals.astype(vals.dtype), None, None


decode_coo.defvjp(_decode_coo_fwd, _decode_coo_bwd)


# ----------------------------------------------------------------------------- row layout
class BatchTopKRows(NamedTuple):
    """The batch's k B largest activations, by sample in rows of J slots (module docstring)."""

    vals_RxJ: Array  # ReLU of the selected pre-activations (float32; 0 in empty slots)
    latent_RxJ: Array  # int32: which latent (0 in empty slots)
    sample_R: Array  # int32: which sample each row belongs to (0 for empty rows)
    threshold: Array  # () the N-th largest pre-activation: what the inference threshold tracks


def row_slots(k: int) -> int:
    """J for mean k codes per sample: about 2 sqrt(k), at most k. The kernels' work grows with the
    slots, R J ~ N + B J, and with the rows, R ~ N / J + B; J ~ sqrt(k) balances the two."""
    return max(1, min(k, math.ceil(2 * math.sqrt(k))))


def _xla_rows(pre_BxM: Array, n: int, slots: int) -> tuple[Array, Array, Array, Array]:
    """`native.batch_topk`'s layout through lax.top_k: entries sorted by flat index, each placed
    at row rowstart_b + p // J, slot p % J (p its position among sample b's entries)."""
    b, m = pre_BxM.shape
    rows = native.batch_topk_rows(n, b, slots)
    top, flat = jax.lax.top_k(pre_BxM.reshape(-1), n)
    flat = jnp.sort(flat)
    v = pre_BxM.reshape(-1)[flat]
    sample, latent = flat // m, (flat % m).astype(jnp.int32)
    count = jnp.zeros((b,), jnp.int32).at[sample].add(1)
    first_entry, rows_of = jnp.cumsum(count) - count, (count + slots - 1) // slots
    row_end = jnp.cumsum(rows_of)
    pos = jnp.arange(n) - first_entry[sample]
    r, j = (row_end - rows_of)[sample] + pos // slots, pos % slots
    vals = jnp.zeros((rows, slots), F32).at[r, j].set(v)
    lat = jnp.zeros((rows, slots), jnp.int32).at[r, j].set(latent)
    row_sample = jnp.searchsorted(row_end, jnp.arange(rows), side="right").astype(jnp.int32)
    return vals, lat, jnp.where(row_sample < b, row_sample, 0), top[-1:]


def _select_rows(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int, dt) -> tuple[Array, ...]:
    """(v, i, s, t) of the row layout (`native.batch_topk`'s, one cell) for pre = x W_e^T + b_e.
    Under vmap over cells sharing x, one GEMM for the whole group, (B, C m) = x [W_e,1; ...]^T
    (the layout XLA's CPU GEMM runs fastest), read in place by the native kernel."""
    n, slots = k * x_BxD.shape[0], row_slots(k)

    def select(pre_BxCxM, b_CxM):
        xla = jax.vmap(lambda p, b: _xla_rows(p + b, n, slots), in_axes=(1, 0))
        return _cpu(lambda p, b: native.batch_topk(p, b, n, slots), xla, pre_BxCxM.size)(pre_BxCxM, b_CxM)

    def one(w, b, x):
        return tuple(a[0] for a in select(_gemm(x, w, dt)[:, None], b[None]))
    f = jax.custom_batching.custom_vmap(one)

    @f.def_vmap
    def rule(axis_size, in_batched, w, b, x):
        if in_batched != [True, True, False]:
            return jax.vmap(one, in_axes=[0 if t else None for t in in_batched])(w, b, x), (True,) * 4
        c, m, d = w.shape
        return select(_gemm(x, w.reshape(c * m, d), dt).reshape(x.shape[0], c, m), b), (True,) * 4
    return f(W_enc_MxD, b_enc_M, x_BxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batchtopk_rows(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    _check_k(k, W_enc_MxD.shape[0])
    v, i, s, t = _select_rows(W_enc_MxD, b_enc_M, x_BxD, k, _dtype(compute_dtype))
    return jnp.maximum(v, 0.0), i, s, t[0]


def _batchtopk_rows_fwd(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    out = _batchtopk_rows(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return out, (W_enc_MxD, x_BxD, out[0] > 0, out[1], out[2])


def _batchtopk_rows_bwd(k, compute_dtype, res, cot):
    W, x, active, latent, sample = res
    dpre = jnp.where(active, cot[0], 0.0).astype(F32)
    dt = _dtype(compute_dtype)
    dW, db = _row_scatter(dpre, _take_rows(x.astype(dt), sample), latent, W.shape[0])
    dx = _segment_rows(_gather_sum(dpre, W, latent), sample, x.shape[0])  # dropped unless x is differentiated
    return dW.astype(W.dtype), db.astype(W.dtype), dx.astype(x.dtype)


_batchtopk_rows.defvjp(_batchtopk_rows_fwd, _batchtopk_rows_bwd)


def batchtopk_rows(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int,
                   compute_dtype: str = "float32") -> BatchTopKRows:
    """The N = k B largest entries of pre = x W_e^T + b_e over the whole batch (ties: the lower
    flat index), c = ReLU of them, in the row layout (module docstring; a sample's latents in
    increasing order), and the N-th largest pre-activation. Sparse VJP to W_e and b_e: dL/dpre
    scattered into the selected rows only. compute_dtype: the encoder GEMM's operands and the
    rows of x that its VJP reads."""
    vals, latent, sample, threshold = _batchtopk_rows(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return BatchTopKRows(vals, latent, sample, jax.lax.stop_gradient(threshold))


def _take_rows(table_SxD: Array, idx_R: Array) -> Array:
    """table[idx]: (R, D) float32."""
    return _gather_sum(jnp.ones(idx_R.shape + (1,), F32), table_SxD, idx_R[:, None])


def _segment_rows(rows_RxD: Array, sample_R: Array, batch: int) -> Array:
    """out_b = sum over rows r with s_r = b of rows_r: (batch, D) float32."""
    return _row_scatter(jnp.ones(sample_R.shape + (1,), F32), rows_RxD, sample_R[:, None], batch)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def decode_rows(atoms_MxD: Array, vals_RxJ: Array, latent_RxJ: Array, sample_R: Array, batch: int,
                compute_dtype: str = "float32") -> Array:
    """x^_b = sum over rows r with s_r = b of sum_j c_rj a_{i_rj}: (batch, d), with the sparse VJP
    of the module docstring (the atoms used as given; in bfloat16 the rows the kernels read, the
    atoms and dL/dx^, are rounded to it, the sums stay float32)."""
    y = _gather_sum(vals_RxJ, atoms_MxD.astype(_dtype(compute_dtype)), latent_RxJ)
    return _segment_rows(y, sample_R, batch)


def _decode_rows_fwd(atoms_MxD, vals_RxJ, latent_RxJ, sample_R, batch, compute_dtype):
    out = decode_rows(atoms_MxD, vals_RxJ, latent_RxJ, sample_R, batch, compute_dtype)
    return out, (atoms_MxD, vals_RxJ, latent_RxJ, sample_R)


def _decode_rows_bwd(batch, compute_dtype, res, g_BxD):
    atoms, vals, latent, sample = res
    dt = _dtype(compute_dtype)
    g_R = _take_rows(g_BxD.astype(dt), sample).astype(dt)
    d_vals = _dots(g_R, None, atoms.astype(dt), latent)
    d_atoms = _scatter_sum(vals, g_R, None, latent, atoms.shape[0])
    return d_atoms.astype(atoms.dtype), d_vals.astype(vals.dtype), None, None


decode_rows.defvjp(_decode_rows_fwd, _decode_rows_bwd)
