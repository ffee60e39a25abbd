"""BatchTopK's sparse codes and decoder (one cell; vmap for a group), on the kernels of
`sae_jax.sparse`.

BatchTopK (Bussmann et al. 2024) keeps the N = k B largest pre-activations of the whole batch, so
a sample holds any number of them. They are laid out by sample in rows (`batchtopk_rows`,
`decode_rows`): sample b's c_b entries fill
ceil(c_b / J) rows of J slots (R = ceil(N / J) + B rows hold any batch; empty slots have code 0),
each row r tagged with its sample s_r, so that TopK's row kernels run unchanged on it:

    y_r   = sum_j c_rj a_{i_rj}              (TopK's gather-sum, per row)
    x^_b  = sum over rows r with s_r = b of y_r
    dL/dc_rj = g_{s_r} . a_{i_rj},  dL/da_l = sum over (r, j) with i_rj = l of c_rj g_{s_r}.

On the CPU the selection and the layout are one native kernel (`native.batch_topk`) and the rest
are the native row kernels; elsewhere XLA builds the same layout from lax.top_k. The encoder's
VJP is `sparse.topk_codes`' on the rows.
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
    _dots,
    _dtype,
    _gather_sum,
    _gemm,
    _row_scatter,
    _scatter_sum,
)

Array = jax.Array




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
        return native.on_cpu(lambda p, b: native.batch_topk(p, b, n, slots), xla, pre_BxCxM.size)(pre_BxCxM, b_CxM)

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
