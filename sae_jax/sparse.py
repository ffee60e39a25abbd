"""Sparse codes and a sparse decoder for TopK and BatchTopK SAEs (one cell; vmap for a group);
BatchTopK's layouts (rows of a sample's codes; COO) are in `sae_jax.sparse_coo`, on the kernels
here.

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

TopK's loss reads x^ only through the per-sample squared error |t_b - x^_b|^2: `decode_sq_err`
returns it with the same VJP (g_b = 2 dL/dsq_b (x^_b - t_b)), and on the CPU computes the
gather, the error and the dot products g_b . a_{i_bj} in one pass per sample. With the atoms the
unit rows of D, `sae_jax.sparse_unit.decode_sq_err_unit` never writes them out there: the codes
are scaled, c_bj / n_{i_bj}, and the scatter-add of dL/da_l applies the unit-norm VJP
(dL/dD_l = dL/da_l / n_l - (dL/da_l . D_l) D_l / (n_l^2 |D_l|)) to each row it finishes.

These equal autodiff of the dense formulation (c scattered into a (B, m) matrix of zeros,
x^ = c unit_rows(D)) to float tolerance (tests/test_sparse.py). A pre-activation that is
selected but negative gives a zero code and no gradient, as ReLU does.

On the CPU, top-k, the gathers and the scatter-adds of the TopK layout run as native kernels
(`sae_jax.native`, XLA FFI custom calls built on first use; `kernels` switches them off). XLA's
own kernels remain for other backends, for BatchTopK's COO layout and where the native ones did
not build: XLA's CPU gather and scatter run fast only on whole rows, a batch of them at a time,
so each of those loops over the k slots (a `fori_loop`) and moves B rows (or B x 8) per trip,
and the (B, k, d) array of gathered rows never exists. Under vmap over cells sharing x, the
encoder's pre-activations come from one GEMM for the whole group. `compute_dtype` casts the
encoder GEMM's operands (float32 accumulation) and, in the TopK layout, the rows that the
decoder's gather, its dot products and the scatter-adds read (atoms, dL/dx^, x), as the dense
bfloat16 step rounds its GEMMs' operands; the codes, the sums and every gradient stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax import native, sae
from sae_jax.errors import UsageError

Array = jax.Array
F32 = jnp.float32
UNROLL = 8  # slots per trip of the gather loop, unrolled (measured: 8 beat 1, 16 and 32)
P = "promise_in_bounds"
MAX_UNROLLED_CELLS = 16  # ... up to this many cells; beyond, one batched kernel
# the switch between the native CPU kernels and XLA's lives in `native` (re-exported here)
kernels, native_in_use = native.kernels, native.in_use


def _check_k(k: int, m: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= m:
        raise UsageError(f"`k` must be an integer in [1, {m}] (the latents), got {k!r}", field="k")


def _dtype(compute_dtype: str):
    if compute_dtype not in sae.COMPUTE_DTYPES:
        raise UsageError(f"`compute_dtype` must be one of {sae.COMPUTE_DTYPES}, got {compute_dtype!r}",
                         field="compute_dtype")
    return jnp.dtype(compute_dtype)


def _top_k(pre_NxM: Array, b_PxM: Array, k: int) -> tuple[Array, Array]:
    """Per row n the k largest of pre_n + b_{n mod P} and their columns (descending from XLA,
    in no particular order from the native kernel)."""
    def xla(pre, b):
        rows = pre.reshape(-1, b.shape[0], pre.shape[-1]) + b
        # the barrier keeps XLA's TopK rewrite (sort + slice -> TopK call) intact: without it,
        # some consumers (k = 8: a reshape) fold into the slice and XLA sorts all m latents
        return tuple(jax.lax.optimization_barrier(jax.lax.top_k(rows.reshape(pre.shape), k)))
    return native.on_cpu(lambda pre, b: native.topk(pre, k, b), xla, pre_NxM.shape[-1])(pre_NxM, b_PxM)


def kth_largest(pre_NxM: Array, k: int) -> Array:
    """The k-th largest entry of each row, (N,) (no gradient: for masks and thresholds)."""
    return jnp.min(_top_k_values(pre_NxM, k), axis=-1)


def _top_k_values(pre_NxM: Array, k: int) -> Array:
    pre = jax.lax.stop_gradient(pre_NxM)
    if pre.dtype != F32:  # the native kernel is float32 only
        return jax.lax.top_k(pre, k)[0]
    return _top_k(pre, jnp.zeros((1, pre.shape[-1]), F32), k)[0]


def _pre_top_k(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int, dt) -> tuple[Array, Array]:
    """Per sample the k largest of pre = x W_e^T + b_e (operands in dt, float32 accumulation).
    Under vmap over cells sharing x, one GEMM for the whole group, (B, C m) = x [W_e,1; ...]^T,
    the layout XLA's CPU GEMM runs fastest (benchmarks/grid_step.py), read in place by top-k."""
    def one(w, b, x):
        return _top_k(_gemm(x, w, dt), b[None], k)
    f = jax.custom_batching.custom_vmap(one)

    @f.def_vmap
    def rule(axis_size, in_batched, w, b, x):
        if in_batched != [True, True, False]:
            return jax.vmap(one, in_axes=[0 if t else None for t in in_batched])(w, b, x), (True, True)
        n, m, d = w.shape
        pre = _gemm(x, w.reshape(n * m, d), dt).reshape(x.shape[0], n, m)
        v, i = _top_k(pre, b, k)  # (B, C, k)
        return (v.transpose(1, 0, 2), i.transpose(1, 0, 2)), (True, True)
    return f(W_enc_MxD, b_enc_M, x_BxD)


# ----------------------------------------------------------------------------- kernels
# Index arrays are (N, J): entry n (a sample) holds J slots. A kernel loops over the slots, CHUNK
# at a time, and moves N x CHUNK rows per trip.
CHUNK = 8


def _per_cell(f):
    """f, whose vmap runs f once per batch element (a loop unrolled at trace time) instead of one
    batched gather/scatter: XLA's CPU backend ran the unbatched row gathers and scatter-adds about
    twice as fast (4 cells, one run against the other). Arguments: arrays only."""
    g = jax.custom_batching.custom_vmap(f)

    @g.def_vmap
    def rule(axis_size, in_batched, *args):
        if axis_size > MAX_UNROLLED_CELLS:  # bound the compiled program's size
            return jax.vmap(f, in_axes=[0 if b else None for b in in_batched])(*args), True
        outs = [g(*[a[i] if b else a for a, b in zip(args, in_batched)]) for i in range(axis_size)]
        return jnp.stack(outs), True
    return g


def _chunks(a_NxJ: Array) -> Array:
    """(T, N, CHUNK): the slots in chunks, the last padded with zeros (weight 0, index 0)."""
    n, j = a_NxJ.shape
    a = jnp.pad(a_NxJ, ((0, 0), (0, (-j) % CHUNK)))
    return a.reshape(n, -1, CHUNK).transpose(1, 0, 2)


def _rows(table: Array, i: Array | None) -> Array:
    """table[i] as float32 (N, CHUNK, D); i None: row n of the table for every slot."""
    return (table[:, None, :] if i is None else jnp.take(table, i, axis=0, mode="clip")).astype(F32)


def _unpack(idx, first, second):
    """The index arrays passed to a kernel, back in their places (None where none was given)."""
    idx = list(idx)
    return (None if first is None else idx.pop(0)), (None if second is None else idx.pop(0))


def _gather_sum(w_NxJ: Array, table_SxD: Array, src_NxJ: Array) -> Array:
    """out_n = sum_j w_nj table[src_nj]: (N, D) float32, accumulated in place slot by slot."""
    return native.on_cpu(native.gather_sum, _xla_gather_sum, w_NxJ.size)(w_NxJ, table_SxD, src_NxJ)


def _xla_gather_sum(w_NxJ: Array, table_SxD: Array, src_NxJ: Array) -> Array:
    w_JxN, src_JxN = w_NxJ.T.astype(F32), src_NxJ.T

    def kernel(w, table, src):
        def body(j, acc):
            return acc + w[j][:, None] * jnp.take(table, src[j], axis=0, mode="clip").astype(F32)
        return jax.lax.fori_loop(0, w.shape[0], body, jnp.zeros((w.shape[1], table.shape[-1]), F32),
                                 unroll=min(UNROLL, w.shape[0]))
    return _per_cell(kernel)(w_JxN, table_SxD, src_JxN)


def _scatter_sum(w_NxJ: Array, table_SxD: Array, src_NxJ: Array | None, dst_NxJ: Array,
                 n_out: int) -> Array:
    """out[dst_nj] += w_nj table[src_nj] (src None: table row n): (n_out, D) float32."""
    if src_NxJ is None:
        return _row_scatter(w_NxJ, table_SxD, dst_NxJ, n_out)[0]
    return _xla_scatter_sum(w_NxJ, table_SxD, src_NxJ, dst_NxJ, n_out)


def _xla_scatter_sum(w_NxJ: Array, table_SxD: Array, src_NxJ: Array | None, dst_NxJ: Array,
                     n_out: int) -> Array:
    def kernel(w, table, *idx):
        src, dst = _unpack(idx, src_NxJ, dst_NxJ)

        def body(t, acc):
            upd = w[t][..., None] * _rows(table, None if src is None else src[t])
            return acc.at[dst[t]].add(upd, mode=P)
        return jax.lax.fori_loop(0, w.shape[0], body, jnp.zeros((n_out, table.shape[-1]), F32))
    idx = [_chunks(i) for i in (src_NxJ, dst_NxJ) if i is not None]
    return _per_cell(kernel)(_chunks(w_NxJ.astype(F32)), table_SxD, *idx)


def _row_scatter(w_NxJ: Array, rows_NxD: Array, dst_NxJ: Array, n_out: int) -> tuple[Array, Array]:
    """(out, col): out[dst_nj] += w_nj rows_n, (n_out, D); col[dst_nj] += w_nj, (n_out,)."""
    def xla(w, rows, dst):
        col = jnp.zeros((n_out,), F32).at[dst.reshape(-1)].add(w.reshape(-1).astype(F32), mode=P)
        return _xla_scatter_sum(w, rows, None, dst, n_out), col
    return native.on_cpu(lambda w, rows, dst: native.scatter(w, rows, dst, n_out), xla, w_NxJ.size)(
        w_NxJ, rows_NxD, dst_NxJ)


def _dots(a_SxD: Array, a_NxJ: Array | None, b_TxD: Array, b_NxJ: Array | None) -> Array:
    """out_nj = a[a_nj] . b[b_nj] (index None: row n): (N, J) float32."""
    if a_NxJ is None and b_NxJ is not None:
        return native.on_cpu(native.dots, lambda a, b, i: _xla_dots(a, None, b, i), b_NxJ.size)(
            a_SxD, b_TxD, b_NxJ)
    return _xla_dots(a_SxD, a_NxJ, b_TxD, b_NxJ)


def _xla_dots(a_SxD: Array, a_NxJ: Array | None, b_TxD: Array, b_NxJ: Array | None) -> Array:
    n, j = (a_NxJ if a_NxJ is not None else b_NxJ).shape

    def kernel(a, b, *idx):
        ai, bi = _unpack(idx, a_NxJ, b_NxJ)
        pick = lambda i, t: None if i is None else i[t]

        def body(carry, t):
            return carry, jnp.einsum("ncd,ncd->nc", _rows(a, pick(ai, t)), _rows(b, pick(bi, t)))
        return jax.lax.scan(body, None, jnp.arange(idx[0].shape[0]))[1]
    idx = [_chunks(i) for i in (a_NxJ, b_NxJ) if i is not None]
    out_TxNxC = _per_cell(kernel)(a_SxD, b_TxD, *idx)
    return out_TxNxC.transpose(1, 0, 2).reshape(n, -1)[:, :j]


def _gemm(x_BxD: Array, w_MxD: Array, dt) -> Array:
    """x w^T with operands in dt, float32 accumulation: (B, M)."""
    return jnp.einsum("bd,md->bm", x_BxD.astype(dt), w_MxD.astype(dt), preferred_element_type=F32)


def _encoder_grads(W_enc_MxD: Array, x_BxD: Array, dpre_NxJ: Array, latent_NxJ: Array,
                   sample_NxJ: Array | None, rows_dtype=F32) -> tuple[Array, Array, Array]:
    """(dW_e, db_e, dx) from dL/dpre at the selected (sample, latent) pairs (sample None: the
    TopK layout, row n holds sample n's slots); the TopK layout reads x's rows in rows_dtype."""
    m, batch = W_enc_MxD.shape[0], x_BxD.shape[0]
    if sample_NxJ is None:
        dW, db = _row_scatter(dpre_NxJ, x_BxD.astype(rows_dtype), latent_NxJ, m)
        dx = _gather_sum(dpre_NxJ, W_enc_MxD, latent_NxJ)  # dropped by XLA unless x is differentiated
    else:
        dW = _scatter_sum(dpre_NxJ, x_BxD, sample_NxJ, latent_NxJ, m)
        db = jnp.zeros((m,), F32).at[latent_NxJ.reshape(-1)].add(dpre_NxJ.reshape(-1), mode=P)
        dx = _scatter_sum(dpre_NxJ, W_enc_MxD, latent_NxJ, sample_NxJ, batch)
    return dW.astype(W_enc_MxD.dtype), db.astype(W_enc_MxD.dtype), dx.astype(x_BxD.dtype)


# ----------------------------------------------------------------------------- TopK
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def topk_codes(W_enc_MxD: Array, b_enc_M: Array, x_BxD: Array, k: int,
               compute_dtype: str = "float32") -> tuple[Array, Array]:
    """(c_BxK, i_BxK): per sample the k largest pre = x W_e^T + b_e (in no particular order on
    the CPU's native kernels, descending elsewhere), c = ReLU of them, i their latents (int32).
    The VJP scatters k rows per sample into dW_e, db_e."""
    _check_k(k, W_enc_MxD.shape[0])
    v, i = _pre_top_k(W_enc_MxD, b_enc_M, x_BxD, k, _dtype(compute_dtype))
    return jnp.maximum(v, 0.0), i


def _topk_fwd(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype):
    c, i = topk_codes(W_enc_MxD, b_enc_M, x_BxD, k, compute_dtype)
    return (c, i), (W_enc_MxD, x_BxD, c > 0, i)


def _topk_bwd(k, compute_dtype, res, cot):
    W, x, active_BxK, i_BxK = res
    dpre = jnp.where(active_BxK, cot[0], 0.0).astype(F32)
    return _encoder_grads(W, x, dpre, i_BxK, None, _dtype(compute_dtype))


topk_codes.defvjp(_topk_fwd, _topk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def decode(atoms_MxD: Array, vals_BxK: Array, idx_BxK: Array, compute_dtype: str = "float32") -> Array:
    """x^_b = sum_j c_bj a_{i_bj}, with the sparse VJP of the module docstring; the atoms a are
    used as given (normalise them first: autodiff carries that VJP). In bfloat16 the rows the
    kernels read (the atoms, and dL/dx^ in the VJP) are rounded to it; the sums stay float32."""
    return _gather_sum(vals_BxK, atoms_MxD.astype(_dtype(compute_dtype)), idx_BxK)


def _decode_fwd(atoms_MxD, vals_BxK, idx_BxK, compute_dtype):
    return decode(atoms_MxD, vals_BxK, idx_BxK, compute_dtype), (atoms_MxD, vals_BxK, idx_BxK)


def _decode_bwd(compute_dtype, res, g_BxD):
    atoms, vals, idx = res
    dt = _dtype(compute_dtype)
    g = g_BxD.astype(dt)
    d_vals = _dots(g, None, atoms.astype(dt), idx)
    d_atoms = _scatter_sum(vals, g, None, idx, atoms.shape[0])
    return d_atoms.astype(atoms.dtype), d_vals.astype(vals.dtype), None


decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_sq_err(atoms_MxD: Array, vals_BxK: Array, idx_BxK: Array, target_BxD: Array,
                  compute_dtype: str = "float32") -> Array:
    """sq_b = |t_b - x^_b|^2, x^_b = sum_j c_bj a_{i_bj} (`decode`): (B,), the per-sample
    reconstruction error of TopK's loss, with `decode`'s sparse VJP composed with it
    (dL/dx^_b = 2 g_b e_b for cotangent g, e = x^ - t). Under differentiation on the CPU's native
    kernels one pass per sample computes x^, e, |e|^2 and the VJP's dot products e_b . a_{i_bj}
    while the sample's k atoms are still in cache. In bfloat16 the atoms are rounded as in
    `decode`, e stays float32 in the dot products and is rounded for the scatter-add."""
    x_hat = decode(atoms_MxD, vals_BxK, idx_BxK, compute_dtype)
    return jnp.sum(jnp.square(target_BxD - x_hat), axis=-1)


def _xla_decode_err(w_NxJ: Array, table_SxD: Array, idx_NxJ: Array, target_NxD: Array):
    e = _gather_sum(w_NxJ, table_SxD, idx_NxJ) - target_NxD
    return e, _dots(e, None, table_SxD, idx_NxJ), jnp.sum(jnp.square(e), axis=-1)


def _decode_sq_err_fwd(atoms_MxD, vals_BxK, idx_BxK, target_BxD, compute_dtype):
    atoms = atoms_MxD.astype(_dtype(compute_dtype))
    e, r, sq = native.on_cpu(native.decode_err, _xla_decode_err, vals_BxK.size)(
        vals_BxK.astype(F32), atoms, idx_BxK, target_BxD.astype(F32))
    return sq, (atoms_MxD, vals_BxK, idx_BxK, e, r, jnp.zeros((), target_BxD.dtype))


def _decode_sq_err_bwd(compute_dtype, res, g_B):
    atoms, vals, idx, e, r, target_zero = res
    s = 2.0 * g_B.astype(F32)[:, None]  # d sq_b / d x^_b = 2 e_b
    d_atoms = _scatter_sum(vals * s, e.astype(_dtype(compute_dtype)), None, idx, atoms.shape[0])
    return (d_atoms.astype(atoms.dtype), (s * r).astype(vals.dtype), None,
            (-s * e).astype(target_zero.dtype))


decode_sq_err.defvjp(_decode_sq_err_fwd, _decode_sq_err_bwd)

