"""Native CPU kernels for the TopK sparse decoder: XLA FFI custom calls compiled on first use.

`_native/` holds five kernels (their equations are in its files and in
`sae_jax.sparse`): per-row top-k, the decoder's row gather-sum, the k dot products of its VJP,
the two fused with the error against a target (`decode_err`), and a deterministic scatter-add
(rows grouped by target with a counting sort, so no two threads write one row). All but top-k
read their rows in float32 or in bfloat16 (half the bytes; the sums stay float32). They replace
XLA:CPU's single-threaded TopK and its slow row gathers; on other backends `sae_jax.sparse` keeps
its XLA formulation. Two more normalise the decoder's atoms for it and carry that VJP
(`unit_rows`, `unit_rows_vjp`: one pass per row where XLA:CPU makes six). Two run every grid's
optimizer step on the CPU (`sae_jax.adam`): Adam's finite check (`adam_check`) and its update
written in place (`adam_apply`), two passes over each
parameter where XLA:CPU makes about twenty. One serves the SynthSAEBench sampler
(`sae_jax.synth_slots`): x = V W reading only the rows of W that V's nonzeros select
(`sparse_rows`).

The library is built on first use and cached (`sae_jax.native_build`: where, and how safely);
it lists its FFI targets itself (`targets`), and each is registered with XLA. Without a
compiler, where the build fails, or with `SAE_JAX_NATIVE=0`, `sae_jax.sparse` runs XLA's kernels
instead and `status()` says why; a CPU program that goes without them for any reason but
`SAE_JAX_NATIVE=0` prints that reason once per process on stderr (`warn_unavailable`).
`SAE_JAX_NATIVE_THREADS` caps the threads. Inputs with more than 2^31 - 64 entries (a row of
top-k, or N x J slots) are refused by the kernels; `sae_jax.sparse` sends such shapes to XLA.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import native_build

F32, I32 = jnp.float32, jnp.int32
MAX_ENTRIES = 2 ** 31 - 64  # the kernels' int32 scratch offsets
DISABLED = "disabled by SAE_JAX_NATIVE=0"
_STATE: dict = {}


def targets(lib: ctypes.CDLL) -> dict[str, int]:
    """The library's FFI targets: name -> handler address (its table, SaeTargetCount ...)."""
    lib.SaeTargetCount.restype = ctypes.c_int64
    lib.SaeTargetName.restype, lib.SaeTargetName.argtypes = ctypes.c_char_p, [ctypes.c_int64]
    lib.SaeTargetHandler.restype, lib.SaeTargetHandler.argtypes = ctypes.c_void_p, [ctypes.c_int64]
    return {lib.SaeTargetName(i).decode(): lib.SaeTargetHandler(i) for i in range(lib.SaeTargetCount())}


def _load() -> str:
    """'' once the kernels are registered with XLA for the CPU, else why not."""
    if os.environ.get("SAE_JAX_NATIVE", "1") == "0":
        return DISABLED
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "ffi_call"):
        return f"jax {jax.__version__} has no jax.ffi"
    cxx = native_build.compiler()
    if cxx is None:
        return "no C++ compiler (set CXX, or install g++)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(native_build.library(cxx)))
        for target, handler in targets(lib).items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure to build or load means: use XLA's kernels
        return str(e) or type(e).__name__
    _STATE["lib"] = lib  # keep the library loaded
    return ""


@functools.cache
def status() -> str:
    """'' when the native kernels are in use on the CPU, else the reason they are not."""
    return _load()


def available() -> bool:
    return status() == ""


def warn_unavailable() -> None:
    """Says on stderr, once per process, that the kernels are unavailable and why (for a CPU
    program that would have used them); nothing where SAE_JAX_NATIVE=0 turned them off."""
    if available() or status() == DISABLED or _STATE.get("warned"):
        return
    _STATE["warned"] = True
    print(f"sae_jax: native CPU kernels unavailable ({status()}); using XLA's kernels (slower)",
          file=sys.stderr, flush=True)


_ON = True  # on the CPU, use the kernels where they compiled (`kernels`)


@contextlib.contextmanager
def kernels(native_on: bool):
    """Inside, programs traced from here on use the native CPU kernels (True, the default where
    they built) or XLA's (False). The choice is read when a function is traced, and jax caches
    traces (of jit, custom_vjp, ...): its caches are cleared on the way in and out."""
    global _ON
    old, _ON = _ON, native_on
    jax.clear_caches()
    try:
        yield
    finally:
        _ON = old
        jax.clear_caches()


def in_use() -> bool:
    """Whether programs traced now use the native CPU kernels (`kernels`, `status()`; only where
    jax's default backend is the CPU: elsewhere the library is not even built). Where they would
    but are unavailable, `warn_unavailable` says so once."""
    if not (_ON and jax.default_backend() == "cpu"):
        return False
    warn_unavailable()
    return available()


def cpu_only() -> bool:
    """Whether every backend jax has started is the CPU: then nothing traced here can be lowered
    for another platform."""
    import jax.extend.backend as jeb

    return set(jeb.backends()) == {"cpu"}


def on_cpu(native_fn: Callable, xla_fn: Callable, entries: int = 0) -> Callable:
    """native_fn where programs traced now run on the CPU with the native kernels (`in_use`), else
    xla_fn, which also takes inputs of more than `MAX_ENTRIES` entries. Where jax has another
    backend besides the CPU, both are traced and `lax.platform_dependent` lowers the one of the
    platform the program is lowered for; on a CPU-only machine only native_fn is traced (tracing
    the other, never lowered, took a few seconds of every grid run), so a program traced there
    lowers for the CPU alone (not for `jax.export` to other platforms)."""
    if not in_use() or entries > MAX_ENTRIES:
        return xla_fn
    if cpu_only():
        return native_fn
    return lambda *args: jax.lax.platform_dependent(*args, cpu=native_fn, default=xla_fn)


def _call(target: str, *outs: jax.ShapeDtypeStruct, vmap_method: str = "expand_dims"):
    if not available():
        raise RuntimeError(f"sae_jax.native: {status()}")
    call = jax.ffi.ffi_call(target, outs if len(outs) > 1 else outs[0], vmap_method=vmap_method)
    return (lambda *args, **attrs: tuple(call(*args, **attrs))) if len(outs) > 1 else call


def topk(pre_NxM: jax.Array, k: int, bias_PxM: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per row n the k largest entries of pre_n + bias_{n mod P} (bias (P, M), default 0), and
    their columns, in no particular order (ties: the lower index wins, as in lax.top_k)."""
    if bias_PxM is None:
        bias_PxM = jnp.zeros((1, pre_NxM.shape[-1]), F32)
    bias = bias_PxM.astype(F32).reshape((1,) * (pre_NxM.ndim - 2) + bias_PxM.shape[-2:])
    shape = pre_NxM.shape[:-1] + (k,)
    return _call("sae_topk", jax.ShapeDtypeStruct(shape, F32), jax.ShapeDtypeStruct(shape, I32))(
        pre_NxM.astype(F32), bias)


def batch_topk_rows(n: int, batch: int, slots: int) -> int:
    """The rows of `batch_topk`'s layout: enough for n entries of `batch` samples in rows of
    `slots` (sum_b ceil(c_b / J) <= n / J + B)."""
    return -(-n // slots) + batch


def batch_topk(pre_BxCxM: jax.Array, bias_CxM: jax.Array, n: int,
               slots: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per cell c the n largest entries of the (B, M) matrix pre[:, c] + bias_c (ties: the lower
    flat index), by sample: (v, i, s, t) with v, i (C, R, J) the values and latents, J = slots,
    R = `batch_topk_rows`; sample b's entries (latent order) fill ceil(c_b / J) consecutive rows,
    the samples in order, s (C, R) the sample of each row; slots past them hold 0 (value, latent,
    sample); t (C, 1) the n-th largest value. pre is (B, C, M): one GEMM's output for a group."""
    b, cells, m = pre_BxCxM.shape
    rows = batch_topk_rows(n, b, slots)
    return _call("sae_batch_topk", jax.ShapeDtypeStruct((cells, rows, slots), F32),
                 jax.ShapeDtypeStruct((cells, rows, slots), I32), jax.ShapeDtypeStruct((cells, rows), I32),
                 jax.ShapeDtypeStruct((cells, 1), F32), vmap_method="sequential")(
        pre_BxCxM.astype(F32), bias_CxM.astype(F32), n=np.int64(n))


def _rows(*arrays: jax.Array) -> tuple[str, list[jax.Array]]:
    """The kernels' suffix and row operands: bfloat16 rows when every one is bfloat16 (read at
    half the bytes, widened to float32 in the kernel), else float32."""
    if all(a.dtype == jnp.bfloat16 for a in arrays):
        return "_bf16", list(arrays)
    return "", [a.astype(F32) for a in arrays]


def gather_sum(w_NxJ: jax.Array, table_SxD: jax.Array, idx_NxJ: jax.Array) -> jax.Array:
    """out_n = sum_j w_nj table[idx_nj]: (N, D) float32 (table float32 or bfloat16)."""
    shape = w_NxJ.shape[:-1] + table_SxD.shape[-1:]
    suffix, (table,) = _rows(table_SxD)
    return _call("sae_gather_sum" + suffix, jax.ShapeDtypeStruct(shape, F32))(
        w_NxJ.astype(F32), table, idx_NxJ.astype(I32))


def decode_err(w_NxJ: jax.Array, table_SxD: jax.Array, idx_NxJ: jax.Array, target_NxD: jax.Array,
               scale_S: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(e, r, sq): e_n = sum_j w_nj a[idx_nj] - target_n, (N, D); r_nj = e_n . a[idx_nj], (N, J);
    sq_n = |e_n|^2, (N,), with atoms a = table (a_s = scale_s table_s given scale (S,)). Float32
    (table float32 or bfloat16), one pass per row."""
    suffix, (table,) = _rows(table_SxD)
    lead = w_NxJ.shape[:-1]
    outs = (jax.ShapeDtypeStruct(lead + table_SxD.shape[-1:], F32), jax.ShapeDtypeStruct(idx_NxJ.shape, F32),
            jax.ShapeDtypeStruct(lead + (1,), F32))
    args = (w_NxJ.astype(F32), table, idx_NxJ.astype(I32), target_NxD.astype(F32))
    if scale_S is None:
        e, r, sq = _call("sae_decode_err" + suffix, *outs)(*args)
    else:
        e, r, sq = _call("sae_decode_err_scaled" + suffix, *outs)(*args, scale_S.astype(F32))
    return e, r, sq[..., 0]


def dots(rows_NxD: jax.Array, table_SxD: jax.Array, idx_NxJ: jax.Array) -> jax.Array:
    """out_nj = rows_n . table[idx_nj]: (N, J) float32 (rows and table both bfloat16, or float32)."""
    suffix, (rows, table) = _rows(rows_NxD, table_SxD)
    return _call("sae_dots" + suffix, jax.ShapeDtypeStruct(idx_NxJ.shape, F32))(
        rows, table, idx_NxJ.astype(I32))


def scatter(w_NxJ: jax.Array, rows_NxD: jax.Array, idx_NxJ: jax.Array, n_out: int,
            unit: tuple[jax.Array, jax.Array, float] | None = None) -> tuple[jax.Array, jax.Array]:
    """(out, col): out_l = sum over (n, j) with idx_nj = l of w_nj rows_n, (n_out, D); col_l the
    same sum of w_nj, (n_out,); float32 (rows float32 or bfloat16). Entries outside [0, n_out)
    are dropped. unit = (D, n, eps) (D (n_out, D) and its `unit_rows` norms n (n_out, 1)): each
    out_l becomes `unit_rows_vjp`'s dL/dD_l for cotangent out_l, in the same pass."""
    lead = w_NxJ.shape[:-2]
    suffix, (rows,) = _rows(rows_NxD)
    outs = (jax.ShapeDtypeStruct(lead + (n_out, rows_NxD.shape[-1]), F32), jax.ShapeDtypeStruct(lead + (n_out,), F32))
    args = (w_NxJ.astype(F32), rows, idx_NxJ.astype(I32))
    if unit is None:
        return _call("sae_scatter" + suffix, *outs)(*args)
    atoms, norms, eps = unit
    return _call("sae_scatter_unit" + suffix, *outs)(*args, atoms.astype(F32), norms.astype(F32),
                                                      eps=np.float32(eps))


def unit_rows(w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(a, n): per row of w (.., D), n = s ||w / s|| + eps with s = max |w_i| (1 where 0), and
    a = w / n; n has shape (.., 1). Float32, one pass per row."""
    return _call("sae_unit_rows", jax.ShapeDtypeStruct(w.shape, F32),
                 jax.ShapeDtypeStruct(w.shape[:-1] + (1,), F32), vmap_method="broadcast_all")(
        w.astype(F32), eps=np.float32(eps))


def row_norms(w: jax.Array, eps: float) -> jax.Array:
    """`unit_rows`' n alone, (.., 1)."""
    return _call("sae_row_norms", jax.ShapeDtypeStruct(w.shape[:-1] + (1,), F32), vmap_method="broadcast_all")(
        w.astype(F32), eps=np.float32(eps))


def unit_rows_vjp(w: jax.Array, n: jax.Array, g: jax.Array, eps: float) -> jax.Array:
    """dL/dw = g / n - (g . w) / (n^2 (n - eps)) w per row (0 for the second term where n = eps):
    the VJP of `unit_rows`' a for cotangent g, with its n."""
    return _call("sae_unit_rows_vjp", jax.ShapeDtypeStruct(w.shape, F32), vmap_method="broadcast_all")(
        w.astype(F32), n.astype(F32), g.astype(F32), eps=np.float32(eps))


def sparse_rows(v_NxP: jax.Array, table_PxD: jax.Array) -> jax.Array:
    """out_n = sum over p with v_np != 0 of v_np table_p, (N, D) float32: v @ table, reading only
    the rows of table that v's nonzeros select (the SynthSAEBench sampler's x = V W)."""
    shape = v_NxP.shape[:-1] + table_PxD.shape[-1:]
    return _call("sae_sparse_rows", jax.ShapeDtypeStruct(shape, F32))(v_NxP.astype(F32), table_PxD.astype(F32))


SYNTH_PARS = 5  # rows of the sampler kernels' `par`: threshold t, p, r = P(mu + sigma g > 0), mu, sigma


def synth_solo(z_NxK: jax.Array, bits_NxW: jax.Array, par: jax.Array, col: int, correlated: bool) -> jax.Array:
    """The values (N, K) of K independent slots: slot k fires when u < q, u = (U + 1/2) 2^-32 from
    the word U = bits[n, col + k] (uint32), q = Phi(z_nk - t_k) (`correlated`) or p_k (z unread);
    then relu(mu_k + sigma_k Phi^-1(u / q)), else 0 (par: `SYNTH_PARS` rows of K)."""
    n, k = bits_NxW.shape[0], par.shape[-1]
    return _call("sae_synth_solo", jax.ShapeDtypeStruct((n, k), F32), vmap_method="sequential")(
        z_NxK.astype(F32), bits_NxW, par.astype(F32), col=np.int64(col), correlated=np.int64(correlated))


def synth_groups(eps_NxR: jax.Array, corr_KxR: jax.Array, bits_NxW: jax.Array, par: jax.Array, quad: jax.Array,
                 gate_NxG: jax.Array, col: int, correlated: bool, width: int) -> jax.Array:
    """The values (N, K = B G) of G mutually exclusive groups of B slots (child c of group g at
    c G + g): the winner (drawn with the word bits[n, col + g], q_c = Phi(eps_n . l_c - t_c) or
    p_c; `synth_slots`'s module docstring) holds its value times gate_ng, every other slot 0 (every
    slot where gate_ng = 0). quad (2, Q): 1 - t_i and w_i of the quadrature on [0, 1]."""
    n, k = bits_NxW.shape[0], par.shape[-1]
    return _call("sae_synth_groups", jax.ShapeDtypeStruct((n, k), F32), vmap_method="sequential")(
        eps_NxR.astype(F32), corr_KxR.astype(F32), bits_NxW, par.astype(F32), quad.astype(F32),
        gate_NxG.astype(F32), col=np.int64(col), correlated=np.int64(correlated), width=np.int64(width))


ADAM_COEFS = 9  # (b1, 1 - b1, b2, 1 - b2, 1/(1 - b1^t), 1/(1 - b2^t), eps, eps_root, lr)


def adam_check(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, coef: jax.Array) -> jax.Array:
    """1.0 where every g and every p' of Adam's step (`adam_apply`) is finite, else 0.0: shape (1,).
    p, g, m, v: one float32 parameter's arrays, any shape; coef (ADAM_COEFS,)."""
    return _call("sae_adam_check", jax.ShapeDtypeStruct((1,), F32))(p, g, m, v, coef, rank=np.int64(p.ndim))


def adam_apply(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, coef: jax.Array,
               keep: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(p', m', v') = (p - lr u, c1 g + b1 m, c2 g^2 + b2 v), u = (m' r1) / (sqrt(v' r2 + eps_root)
    + eps) (coef: `ADAM_COEFS`), or (p, m, v) where keep (shape (1,)) is nonzero; written over p, m
    and v (passed in their own shapes: a reshape would cost XLA a copy of each)."""
    if not available():
        raise RuntimeError(f"sae_jax.native: {status()}")
    out = jax.ShapeDtypeStruct(p.shape, F32)
    # under vmap every operand gets the batch dims (an unbatched p, m or v could not be written in place)
    call = jax.ffi.ffi_call("sae_adam_apply", (out, out, out), vmap_method="broadcast_all",
                            input_output_aliases={0: 0, 2: 1, 3: 2})
    return tuple(call(p, g, m, v, coef, keep, rank=np.int64(p.ndim)))
