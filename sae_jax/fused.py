"""Loss and gradients of a whole size group of SAEs at once, written for the backend's fast paths.

`sae.loss` is the readable reference: one cell, autodiff. Here the C cells of a size group
(m latents each, K = C m, one shared batch x of B samples) are differentiated by hand, with
every matmul in a layout that XLA runs as a plain GEMM and no transpose of a (B x K) array.
The codes live as (C, m, B) (a "K x B" layout):

    pre_KxB  = W_e[K x d] x^T[d x B] + b_e       one 2-D GEMM for the whole group (encoder)
    c        = ReLU(pre)
    x^_CxdxB = D^T_c[d x m] c_c[m x B]            per cell (decoder forward; D^ transposed once,
                                                  a weight-sized copy, not a code-sized one)
    r        = x^ - t,   L_c = (1/(B d)) sum r^2 + alpha_c L1(c_c)
    g        = dL/dx^ = (2/(B d)) r
    dL/dc    = D^_c[m x d] g_c[d x B] + alpha_c * s      s = 1/(m B) (report) or 1/B (sum)
    dL/dpre  = dL/dc * [pre > 0]
    dL/dD^   = c_c[m x B] g_c^T[B x d]                 per cell
    dL/dW_e  = dL/dpre[K x B] x[B x d]                 one 2-D GEMM
    dL/db_e  = sum_b dL/dpre
    dL/dD    = the VJP of D -> D^ = unit_rows(D) applied to dL/dD^.

With a decoder bias b_dec (`sae.SAEParams.b_dec_D`) the encoder reads x - b_dec and the decoder
adds b_dec. The encoder GEMM stays one GEMM for the group by folding the bias into the encoder's:
pre = W_e x + b', b' = b_e - W_e b_dec, and x^ gets + b_dec. Then dL/db_e = dL/db' and

    dL/db_dec = sum_b g - W_e^T dL/db',     dL/dW_e = dL/dpre x^T - dL/db' b_dec^T.

Matmul operands are cast to `compute_dtype` (float32 or bfloat16) with float32 accumulation
(`preferred_element_type`); parameters, the loss, its statistics and every elementwise step
stay float32. In float32 the gradients equal `jax.grad(sae.loss)` to float tolerance
(tests/test_fused.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax import sae, sparse_unit

Array = jax.Array
F32 = jnp.float32
COMPUTE_DTYPES = sae.COMPUTE_DTYPES
_ONES = 16  # columns of ones appended to x in the encoder-gradient matmul

# The step's five matmuls for a shared batch, as einsums over c (cell), m (latent), k = (c, m),
# d (input dimension) and b (sample); benchmarks/grid_step.py times each of them.
MATMULS = {
    "encoder forward": "kd,db->kb",
    "decoder forward": "cdm,cmb->cdb",
    "gradient wrt codes": "cmd,cdb->cmb",
    "gradient wrt decoder": "cmb,cdb->cmd",
    "gradient wrt encoder": "kb,bd->kd",
}


def _swap_last(a: Array) -> Array:
    """a with its last two axes swapped, materialised by a gather. XLA's CPU backend runs a
    bfloat16 dot on its fast path only when no operand comes from a transpose op; a transpose
    written as one (or a swapped einsum) is folded into the dot or sends it to float32."""
    r, c = a.shape[-2:]
    return a[..., jnp.arange(r)[None, :], jnp.arange(c)[:, None]]


def _mm(eq: str, a: Array, b: Array, dtype) -> Array:
    return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=F32)


def group_loss_and_grad(params: sae.SAEParams, x_BxD: Array, l1_coeff_C: Array,
                        convention: sae.L1Convention = "report", target_BxD: Array | None = None,
                        compute_dtype: str = "float32") -> tuple[tuple[Array, sae.LossAux], sae.SAEParams]:
    """((L_C, aux with a leading cell axis), dL_c/dparams_c) for every cell c of a size group.

    `params` leaves carry a leading cell axis C; x (B, d) is shared by every cell, or given per
    cell as (C, B, d) (denoising, with a shared target t (B, d); a world axis, with t = x per
    cell); t defaults to x.
    Same values as `jax.vmap(jax.value_and_grad(sae.loss, has_aux=True))` (to float tolerance in
    float32).
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    if convention not in sae.L1_CONVENTIONS:
        raise ValueError(f"l1 convention must be one of {sae.L1_CONVENTIONS}, got {convention!r}")
    dt = jnp.dtype(compute_dtype)
    w_CxMxD, b_CxM, d_CxMxD = params.W_enc_MxD, params.b_enc_M, params.D_MxD
    b_dec_CxD = params.b_dec_D
    if b_dec_CxD is not None:  # b' = b_e - W_e b_dec (module docstring)
        b_CxM = b_CxM - jnp.einsum("cmd,cd->cm", w_CxMxD, b_dec_CxD)
    n_cells, m, d = w_CxMxD.shape
    batch = x_BxD.shape[-2]
    t = (x_BxD if target_BxD is None else target_BxD).astype(F32)
    t_DxB = t.T if t.ndim == 2 else jnp.swapaxes(t, -1, -2)  # (d, B), or (C, d, B) per cell

    # forward. bfloat16 dots run on the fast path only with untransposed operands, so x and the
    # atoms are transposed by a gather (B x d and C x m x d: small next to the codes).
    swap = _swap_last if dt == jnp.bfloat16 else (lambda a: jnp.swapaxes(a, -1, -2))
    shared = x_BxD.ndim == 2  # else (C, B, d): one input per cell (denoising)
    x_lo = x_BxD.astype(dt)
    if shared:
        pre_CxMxB = _mm(MATMULS["encoder forward"], w_CxMxD.reshape(n_cells * m, d), swap(x_lo), dt)
    else:
        pre_CxMxB = _mm("cmd,cdb->cmb", w_CxMxD, swap(x_lo), dt)
    pre_CxMxB = pre_CxMxB.reshape(n_cells, m, batch) + b_CxM[:, :, None]
    c_CxMxB = jnp.maximum(pre_CxMxB, 0.0)
    c_lo = c_CxMxB.astype(dt)
    active_lo = c_lo > 0  # = [pre > 0]; bfloat16 keeps float32's exponent range
    l1_scale = 1.0 / (m * batch) if convention == "report" else 1.0 / batch
    c_sum_CxM = jnp.sum(c_CxMxB, axis=2)
    l1_C = jnp.sum(c_sum_CxM, axis=1) * l1_scale
    n_active_CxM = jnp.sum(active_lo.astype(F32), axis=2)  # only for L0: unused in the grid step
    atoms, unit_vjp = jax.vjp(sparse_unit.unit_rows, d_CxMxD)  # native on the CPU: one pass each way
    atoms_lo = atoms.astype(dt)
    xhat_CxDxB = _mm(MATMULS["decoder forward"], swap(atoms_lo), c_lo, dt)
    if b_dec_CxD is not None:
        xhat_CxDxB = xhat_CxDxB + b_dec_CxD[:, :, None]
    r_CxDxB = xhat_CxDxB - t_DxB
    sq_CxB = jnp.sum(jnp.square(r_CxDxB), axis=1)
    mse_C = jnp.sum(sq_CxB, axis=1) / (batch * d)
    aux = sae.LossAux(mse_C, l1_C, jnp.sum(n_active_CxM, axis=1) / batch, c_sum_CxM > 0, sq_CxB)
    total_C = mse_C + l1_coeff_C * l1_C

    # backward
    g_lo = (r_CxDxB * (2.0 / (batch * d))).astype(dt)
    dc_CxMxB = _mm(MATMULS["gradient wrt codes"], atoms_lo, g_lo, dt)
    dpre_CxMxB = jnp.where(active_lo, dc_CxMxB + (l1_coeff_C * l1_scale)[:, None, None], 0.0)
    d_atoms = _mm(MATMULS["gradient wrt decoder"], c_lo, g_lo, dt)
    dpre_lo = dpre_CxMxB.astype(dt)
    # [x, 1]: the encoder-gradient matmul also sums dL/dpre over the batch (dL/db_e), so no
    # reduction pass over the (C, m, B) array is needed. Padded to 16 columns for the GEMM.
    x_aug = jnp.concatenate([x_lo, jnp.ones(x_lo.shape[:-1] + (_ONES,), dt)], axis=-1)
    if shared:
        d_wb = _mm(MATMULS["gradient wrt encoder"], dpre_lo.reshape(n_cells * m, batch), x_aug, dt)
        d_wb = d_wb.reshape(n_cells, m, d + _ONES)
    else:
        d_wb = _mm("cmb,cbd->cmd", dpre_lo, x_aug, dt)
    d_w, d_b = d_wb[..., :d], d_wb[..., d]
    if b_dec_CxD is None:
        return (total_C, aux), sae.SAEParams(d_w, d_b, unit_vjp(d_atoms)[0])
    g_sum_CxD = jnp.sum(r_CxDxB, axis=2) * (2.0 / (batch * d))
    d_b_dec = g_sum_CxD - jnp.einsum("cmd,cm->cd", w_CxMxD, d_b)
    grads = sae.SAEParams(d_w - d_b[:, :, None] * b_dec_CxD[:, None, :], d_b, unit_vjp(d_atoms)[0], d_b_dec)
    return (total_C, aux), grads
