"""BatchTopK's sparse codes and decoder in COO layout (one cell; vmap for a group), on the
kernels of `sae_jax.sparse`.

BatchTopK (Bussmann et al. 2024) keeps the k B largest pre-activations of the whole batch, so a
sample holds any number of them: the codes are N = k B (value, sample, latent) triples, and

    x^_b       = sum over entries n with sample_n = b of c_n a_{latent_n}
    dL/dc_n    = g_{sample_n} . a_{latent_n}
    dL/da_l    = sum over entries with latent_n = l of c_n g_{sample_n}

with the encoder's VJP as `sparse.topk_codes`'. These run through XLA's kernels on every backend
(slower than the dense step: training keeps BatchTopK groups dense, see `archs.uses_sparse`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.sparse import (F32, _check_k, _dots, _dtype, _encoder_grads, _gemm, _per_cell,
                            _scatter_sum)

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
