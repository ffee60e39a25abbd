"""The TopK section of benchmarks/grid_step.py: a TopK group step through the sparse decoder
(sae_jax.sparse) against the dense L1 group step of the same size (sae_jax.fused), side by side
in one process (interleaved repeats, the minimum of each), and where each step's time goes.

Both steps: C cells of m latents on one shared batch (B, d), loss and gradients, then Adam on
every parameter (grid.apply_grads, the grid's own optimizer step), T steps in one lax.scan.
On the CPU the TopK step runs the native kernels of sae_jax.native where they built; "XLA
kernels" is the same step through XLA's top_k, gathers and scatter-adds (sparse.NATIVE off).
The breakdown comes from a trace of each whole step (`_trace`): parts timed alone, as this
section did before, ran up to 1.6x slower than inside the step (a fresh 64 MB output each call).
"""

from __future__ import annotations

import functools
import time

import _trace
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import fused, grid, native, sae, sparse, sparse_coo, sparse_unit

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
    sq = sparse_unit.decode_sq_err_unit(params.D_MxD, vals, idx, x_BxD, dtype)
    mse = jnp.mean(sq) / x_BxD.shape[-1]
    active = jax.lax.stop_gradient(vals) > 0
    fired = jnp.zeros(params.b_enc_M.shape, bool).at[idx].max(active)
    l0 = jnp.mean(jnp.sum(active, axis=-1).astype(F32))
    return mse, sae.LossAux(mse, jnp.zeros((), F32), l0, fired, sq)


def batchtopk_cell_loss(params: sae.SAEParams, x_BxD, k: int, dtype: str):
    """(MSE, aux) of one BatchTopK cell through the sparse kernels (the row layout training uses)."""
    c = sparse_coo.batchtopk_rows(params.W_enc_MxD, params.b_enc_M, x_BxD, k, dtype)
    x_hat = sparse_coo.decode_rows(sparse_unit.unit_rows(params.D_MxD), c.vals_RxJ, c.latent_RxJ,
                                   c.sample_R, x_BxD.shape[0], dtype)
    sq = jnp.sum(jnp.square(x_BxD - x_hat), axis=-1)
    mse = jnp.mean(sq) / x_BxD.shape[-1]
    active = jax.lax.stop_gradient(c.vals_RxJ) > 0
    fired = jnp.zeros(params.b_enc_M.shape, bool).at[c.latent_RxJ].max(active)
    return mse, sae.LossAux(mse, jnp.zeros((), F32), jnp.sum(active) / x_BxD.shape[0], fired, sq)


def topk_group_grads(params, x_BxD, k: int, dtype: str, loss=topk_cell_loss):
    return jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(0, None, None, None))(
        params, x_BxD, k, dtype)


def _adam(group, out, x, cfg, step):
    (total, aux), grads = out
    return jax.vmap(grid.apply_grads, in_axes=(0, 0, 0, 0, None, None, None, None))(
        group, grads, total, aux, x, 1.0, cfg, step)[0]


def _scan(grads_fn, cfg):
    """T steps (loss, gradients, Adam) of one group over the batches xs: one lax.scan."""
    @functools.partial(jax.jit, donate_argnums=0)
    def run(group, xs):
        def body(g, x):
            return _adam(g, grads_fn(g, x), x, cfg, jnp.zeros((), jnp.int32)), None
        return jax.lax.scan(body, group, xs)[0]
    return run


def carried(run, group, xs):
    """One call of `run` (T steps) per call, its state donated and carried from call to call as
    the training loop's is: no call copies the state (a copy per call of 3 steps cost the TopK
    step 5 ms of its 108 at d 256)."""
    box = [jax.tree.map(jnp.copy, group)]

    def call():
        box[0] = run(box[0], xs)
        jax.block_until_ready(box[0])
    call.state = lambda: box[0]
    return call


def diverged(fns: dict) -> list[str]:
    """The carried steps whose state is no longer finite (their timings would not be a
    training step's: a non-finite row makes every latent a top-k candidate)."""
    finite = jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(t)
                                                  if jnp.issubdtype(a.dtype, jnp.floating)])))
    return [n for n, f in fns.items() if hasattr(f, "state") and not bool(finite(f.state()))]


def dense_grads(dtype: str, cfg):
    return lambda g, x: fused.group_loss_and_grad(g.params, x, g.l1_coeff, cfg.l1_convention, None, dtype)


def setup(d, m, cells, batch, steps):
    spec = grid.GridSpec(tuple(np.logspace(-2, 0, cells)), (m,))
    cfg = grid.TrainConfig(batch_size=batch, fused_step=True)
    group = grid.init_grid(jax.random.PRNGKey(0), spec, d, cfg).groups[0]
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, d)) / np.sqrt(d)
    return group, xs, cfg


def step_fns(d, m, cells, batch, ks, steps, reference: bool = True) -> dict:
    """{name: one call of T steps}: dense L1 per dtype, TopK per (k, dtype); with `reference`
    also TopK through XLA's kernels and BatchTopK's COO path."""
    group, xs, cfg = setup(d, m, cells, batch, steps)
    fns = {}
    for dt in ("float32", "bfloat16"):
        run = _scan(dense_grads(dt, cfg), cfg)
        fns[f"dense {dt}"] = carried(run, group, xs)
        for k in ks:
            run = _scan(functools.partial(lambda g, x, k, dt: topk_group_grads(g.params, x, k, dt),
                                          k=k, dt=dt), cfg)
            fns[f"topk k={k} {dt}"] = carried(run, group, xs)
        if not reference:
            continue
        run = _scan(lambda g, x, dt=dt: topk_group_grads(g.params, x, ks[0], dt), cfg)
        xla = _compiled(run, False, group, xs)  # XLA's top_k, gathers and scatters, for comparison
        fns[f"topk k={ks[0]} {dt} (XLA kernels)"] = carried(xla, group, xs)
        run = _scan(lambda g, x, dt=dt: topk_group_grads(g.params, x, ks[0], dt, batchtopk_cell_loss), cfg)
        fns[f"batchtopk k={ks[0]} {dt}"] = carried(run, group, xs)
    return fns


def _compiled(run, native_on: bool, *args):
    """`run` compiled for args with sae_jax.sparse's native CPU kernels on or off."""
    with sparse.kernels(native_on):
        return run.lower(*args).compile()


def flops(d, m, cells, batch, k) -> dict[str, float]:
    """FLOPs per step (2 per multiply-add): the dense step's five GEMMs, the TopK step's one."""
    return {"(the limit: 2048^3 GEMM)": 2 * 2048 ** 3, "dense step": 5 * 2 * cells * batch * m * d,
            "encoder GEMM": 2 * cells * batch * m * d}


def traced_parts(d, m, cells, batch, k, dtype, steps) -> dict[str, dict[str, float]]:
    """{"dense" | "topk": {kind: seconds per step}} from a trace of each whole step (`_trace`)."""
    group, xs, cfg = setup(d, m, cells, batch, steps)
    out = {}
    for name, grads in (("dense", dense_grads(dtype, cfg)),
                        ("topk", lambda g, x: topk_group_grads(g.params, x, k, dtype))):
        run = _scan(grads, cfg).lower(group, xs).compile()
        state = jax.block_until_ready(run(jax.tree.map(jnp.copy, group), xs))
        out[name] = _trace.breakdown(run, (state, xs), steps)
    return out


def section(d, m, cells, batch, ks, steps, repeats, reference: bool = True) -> dict:
    """Prints and returns the TopK section of benchmarks/grid_step.py."""
    print(f"\n6. TopK group (sparse decoder, sae_jax.sparse) vs the dense L1 group of the same size: "
          f"{cells} cells, m {m}, d {d}, batch {batch}; loss, gradients and Adam; ms per step")
    print(f"   native CPU kernels (sae_jax.native): {native.status() or 'in use on the CPU'}")
    fns = step_fns(d, m, cells, batch, ks, steps, reference)
    k0 = ks[0]
    for dt in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.PRNGKey(3), (2048, 2048)).astype(dt)
        mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
        fns[f"{dt} part: (the limit: 2048^3 GEMM)"] = lambda mm=mm, a=a: jax.block_until_ready(mm(a, a))
    measured = interleaved(fns, repeats)
    bad = diverged(fns)
    print(f"   every timed state still finite: {'yes' if not bad else 'NO: ' + ', '.join(bad)}")
    times = {n: s / steps for n, s in measured.items() if " part: " not in n}
    fl = flops(d, m, cells, batch, k0)
    for name, s in times.items():
        rate = f"  ({fl['dense step'] / s / 1e9:.0f} GFLOP/s)" if name.startswith("dense") else ""
        print(f"   {name:36s} {s * 1e3:8.1f}{rate}")
    fastest = min(times[f"dense {dt}"] for dt in ("float32", "bfloat16"))
    ratios = {}
    for k in ks:
        for dt in ("float32", "bfloat16"):
            ratios[f"k={k} (m/{m // k}) {dt}: dense {dt} / topk"] = times[f"dense {dt}"] / times[f"topk k={k} {dt}"]
        best = min(times[f"topk k={k} {dt}"] for dt in ("float32", "bfloat16"))
        ratios[f"k={k} (m/{m // k}): fastest dense / fastest topk"] = fastest / best
    for dt in ("float32", "bfloat16") if reference else ():
        ratios[f"k={k0} {dt}: dense / topk with XLA's kernels"] = (
            times[f"dense {dt}"] / times[f"topk k={k0} {dt} (XLA kernels)"])
        ratios[f"BatchTopK k={k0} {dt}: dense {dt} / batchtopk"] = (
            times[f"dense {dt}"] / times[f"batchtopk k={k0} {dt}"])
    print("   speed-up (> 1: TopK faster; the issue's target: >= 3 at k <= m/32)")
    for name, r in ratios.items():
        print(f"   {name:52s} {r:5.2f}")
    out = dict(cells=cells, m=m, d=d, batch=batch, ks=list(ks), step=times, ratios=ratios, breakdown={})
    for dt in ("float32", "bfloat16"):
        limit = measured[f"{dt} part: (the limit: 2048^3 GEMM)"]
        out["breakdown"][dt] = traced = traced_parts(d, m, cells, batch, k0, dt, steps)
        dense, topk = traced["dense"], traced["topk"]
        print(f"\n   where the {dt} steps' time goes, from a trace of each step (ms per step; parts "
              f"may overlap, so their sum can exceed the step)")
        print(f"   {'':36s} {'dense':>8s} {'topk k=' + str(k0):>10s}")
        for kind in sorted((set(dense) | set(topk)) - {"wall"}, key=lambda n: -topk.get(n, 0.0)):
            row = lambda t: f"{t[kind] * 1e3:8.1f}" if kind in t else f"{'-':>8s}"
            print(f"   {kind:36s} {row(dense)} {row(topk):>10s}")
        step_d, step_t = times[f"dense {dt}"], times[f"topk k={k0} {dt}"]
        print(f"   {'the step, timed above':36s} {step_d * 1e3:8.1f} {step_t * 1e3:10.1f}")
        rate = fl["encoder GEMM"] / topk.get("GEMM", np.nan) / 1e9
        print(f"   the TopK step's GEMM runs at {rate:.0f} GFLOP/s; the 2048^3 GEMM at "
              f"{fl['(the limit: 2048^3 GEMM)'] / limit / 1e9:.0f}")
        floor = sum(v for n, v in topk.items() if n in ("GEMM", "copy") or n.startswith(("XLA", "Adam", "unit-norm")))
        native_topk = topk.get("top-k (native)", 0.0)
        print(f"   bound with free top-k and sparse kernels: dense / (GEMM + Adam + unit norm + XLA's other work) = "
              f"{step_d / floor:.2f}; with this top-k: {step_d / (floor + native_topk):.2f}")
        traced.update(bound_free_sparse=step_d / floor, bound_with_top_k=step_d / (floor + native_topk))
    return out
