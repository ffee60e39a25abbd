"""The TopK section of benchmarks/grid_step.py: a TopK group step through the sparse decoder
(sae_jax.sparse) against the dense L1 group step of the same size (sae_jax.fused), side by side
in one process (interleaved repeats, the minimum of each), and where the TopK step's time goes.

Both steps: C cells of m latents on one shared batch (B, d), loss and gradients, then Adam on
every parameter (grid.apply_grads, the grid's own optimizer step), T steps in one lax.scan.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import fused, grid, sae, sparse

F32 = jnp.float32


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best seconds per call of each function, the calls interleaved (one warm-up each), so that
    every variant sees the same load on a shared machine."""
    for f in fns.values():
        f()
    best = {k: np.inf for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def topk_cell_loss(params: sae.SAEParams, x_BxD, k: int, dtype: str):
    """(MSE, aux) of one TopK cell through the sparse kernels."""
    vals, idx = sparse.topk_codes(params.W_enc_MxD, params.b_enc_M, x_BxD, k, dtype)
    x_hat = sparse.decode(sae.unit_rows(params.D_MxD), vals, idx, dtype)
    sq = jnp.sum(jnp.square(x_BxD - x_hat), axis=-1)
    mse = jnp.mean(sq) / x_BxD.shape[-1]
    active = jax.lax.stop_gradient(vals) > 0
    fired = jnp.zeros(params.b_enc_M.shape, bool).at[idx].max(active)
    l0 = jnp.mean(jnp.sum(active, axis=-1).astype(F32))
    return mse, sae.LossAux(mse, jnp.zeros((), F32), l0, fired, sq)


def topk_group_grads(params, x_BxD, k: int, dtype: str):
    return jax.vmap(jax.value_and_grad(topk_cell_loss, has_aux=True), in_axes=(0, None, None, None))(
        params, x_BxD, k, dtype)


def _adam(group, out, x, cfg, step):
    (total, aux), grads = out
    return jax.vmap(grid.apply_grads, in_axes=(0, 0, 0, 0, None, None, None, None))(
        group, grads, total, aux, x, 1.0, cfg, step)[0]


def _scan(grads_fn, cfg):
    """T steps (loss, gradients, Adam) of one group over the batches xs: one lax.scan."""
    @jax.jit
    def run(group, xs):
        def body(g, x):
            return _adam(g, grads_fn(g, x), x, cfg, jnp.zeros((), jnp.int32)), None
        return jax.lax.scan(body, group, xs)[0]
    return run


def dense_grads(dtype: str, cfg):
    return lambda g, x: fused.group_loss_and_grad(g.params, x, g.l1_coeff, cfg.l1_convention, None, dtype)


def setup(d, m, cells, batch, steps):
    spec = grid.GridSpec(tuple(np.logspace(-2, 0, cells)), (m,))
    cfg = grid.TrainConfig(batch_size=batch, fused_step=True)
    group = grid.init_grid(jax.random.PRNGKey(0), spec, d, cfg).groups[0]
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, d)) / np.sqrt(d)
    return group, xs, cfg


def steps_table(d, m, cells, batch, ks, steps, repeats, dtypes=("float32", "bfloat16")) -> dict:
    """Seconds per step: dense L1 per dtype, TopK per (k, dtype); one interleaved run."""
    group, xs, cfg = setup(d, m, cells, batch, steps)
    fns = {}
    for dt in dtypes:
        run = _scan(dense_grads(dt, cfg), cfg)
        fns[f"dense {dt}"] = lambda run=run: jax.block_until_ready(run(group, xs))
        for k in ks:
            run = _scan(functools.partial(lambda g, x, k, dt: topk_group_grads(g.params, x, k, dt),
                                          k=k, dt=dt), cfg)
            fns[f"topk k={k} {dt}"] = lambda run=run: jax.block_until_ready(run(group, xs))
    return {name: s / steps for name, s in interleaved(fns, repeats).items()}


def breakdown(d, m, cells, batch, k, dtype, repeats) -> dict[str, float]:
    """Seconds of each part of the TopK group step, each jitted and timed alone (interleaved)."""
    group, xs, cfg = setup(d, m, cells, batch, 1)
    x, p, dt = xs[0], group.params, jnp.dtype(dtype)
    pre = jax.vmap(sparse._pre, in_axes=(0, 0, None, None))(p.W_enc_MxD, p.b_enc_M, x, dt)
    vals, idx = jax.lax.top_k(pre, k)
    vals = jnp.maximum(vals, 0.0)
    atoms = jax.vmap(sae.unit_rows)(p.D_MxD)
    g = jax.random.normal(jax.random.PRNGKey(2), (cells, batch, d)) * 1e-3
    dec_vjp = lambda a, v, i, g: jax.vjp(lambda a, v: sparse.decode(a, v, i, dtype), a, v)[1](g)
    enc_vjp = lambda w, b, v: jax.vjp(lambda w, b: sparse.topk_codes(w, b, x, k, dtype)[0], w, b)[1](v)
    out = jax.jit(topk_group_grads, static_argnums=(2, 3))(p, x, k, dtype)
    V = lambda f, **kw: jax.jit(jax.vmap(f, **kw))
    parts = {
        "encoder GEMM": (V(sparse._pre, in_axes=(0, 0, None, None), ), (p.W_enc_MxD, p.b_enc_M, x, dt)),
        "top_k": (jax.jit(lambda a: jax.lax.top_k(a, k)), (pre,)),
        "decoder gather (forward)": (V(lambda a, v, i: sparse.decode(a, v, i, dtype)), (atoms, vals, idx)),
        "decoder VJP (dc, dD scatter)": (V(dec_vjp), (atoms, vals, idx, g)),
        "encoder VJP (dW scatter, db)": (V(enc_vjp), (p.W_enc_MxD, p.b_enc_M, vals)),
        "Adam (apply_grads)": (jax.jit(lambda gr, o: _adam(gr, o, x, cfg, jnp.zeros((), jnp.int32))),
                               (group, out)),
    }
    fns = {}
    for name, (f, args) in parts.items():
        if name == "encoder GEMM":
            f = jax.jit(jax.vmap(lambda w, b: sparse._pre(w, b, x, dt)))
            args = (p.W_enc_MxD, p.b_enc_M)
        fns[name] = lambda f=f, args=args: jax.block_until_ready(f(*args))
    return interleaved(fns, repeats)
