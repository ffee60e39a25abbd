"""Where the grid step's time goes, side by side in one run on this machine.

The grid: d, dictionary sizes, alphas per size, batch B (default: a 16-cell grid,
d 256, sizes 256-2048, 4 alphas, batch 1024). Printed, each in ms per step and GFLOP/s
(10 d m B FLOPs per cell and step: five matmuls of 2 d m B):

1. the machine's limit: the best 2-D GEMM (2048^3) in float32 and bfloat16 (float32
   accumulation), in XLA and in PyTorch;
2. each of the step's five matmuls over the whole grid, in the layout the fused step uses and as
   a plain 2-D GEMM of the same shape (rows x contraction x columns), float32 and bfloat16;
3. the whole step: float32 autodiff (the reference path), float32 fused, bfloat16 fused;
4. the bfloat16 step's breakdown, each part timed on its own: matmuls, transposes, elementwise
   work (the fused gradient with free matmuls and transposes), the optimizer (Adam, divergence
   check, counters); their sum against the measured step;
5. the PyTorch loop (cells one after another) in float32 and under bfloat16 autocast;
6. a TopK group through the sparse decoder (sae_jax.sparse) against the dense L1 group of the
   same size (C cells of m latents), float32 and bfloat16, at k = m/32, m/64, m/128, and
   where the TopK step's time goes (`--only topk` runs this section alone).

Runs on the default JAX backend (a GPU if there is one) and PyTorch's (cuda if available).
Usage: python benchmarks/grid_step.py [--d 256] [--sizes 256,512,1024,2048] [--alphas 4]
       [--batch 1024] [--steps 10] [--json out.json] [--no-torch]
       [--only topk] [--topk-m 4096] [--topk-cells 4] [--topk-ks 128,64,32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import time

import _sparse_step
import jax
import jax.numpy as jnp
import numpy as np
from _torch_loop import gemm_rate as torch_gemm_rate
from _torch_loop import step_seconds as torch_step_seconds

from sae_jax import fused, grid

F32 = jnp.float32


def timed(fn, repeats: int) -> float:
    """Best seconds per call after one warm-up call (the minimum is the least disturbed by other
    work on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    dev = jax.devices()[0]
    return f"{dev.platform}: {dev.device_kind}" + ("" if dev.platform != "cpu" else f" ({name})")


def rand(shape, dtype, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


def gemm_seconds(rows: int, inner: int, cols: int, dtype, repeats: int = 5) -> float:
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
    a, b = rand((rows, inner), dtype), rand((inner, cols), dtype, 1)
    return timed(lambda: f(a, b).block_until_ready(), repeats)


def einsum_shapes(eq: str, dims: dict[str, int]) -> tuple[tuple, tuple, tuple[int, int, int]]:
    """Operand shapes of `eq` and its plain 2-D GEMM (rows, contraction, columns)."""
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    size = lambda s: int(np.prod([dims[c] for c in s]))
    inner = "".join(c for c in lhs if c in rhs and c not in out)
    rows = size("".join(c for c in lhs if c not in inner))
    return tuple(dims[c] for c in lhs), tuple(dims[c] for c in rhs), (
        rows, size(inner), size("".join(c for c in rhs if c not in inner and c not in lhs)))


def matmul_table(d, sizes, n_alpha, batch, dtype, repeats):
    """{name: (layout seconds, plain 2-D GEMM seconds)} summed over the grid's size groups."""
    out = {}
    for name, eq in fused.MATMULS.items():
        t_layout = t_plain = 0.0
        for m in sizes:
            dims = dict(c=n_alpha, m=m, k=n_alpha * m, d=d, b=batch)
            sa, sb, (rows, inner, cols) = einsum_shapes(eq, dims)
            f = jax.jit(lambda a, b, eq=eq: jnp.einsum(eq, a, b, preferred_element_type=F32))
            a, b = rand(sa, dtype), rand(sb, dtype, 1)
            t_layout += timed(lambda: f(a, b).block_until_ready(), repeats)
            t_plain += gemm_seconds(rows, inner, cols, dtype, repeats)
        out[name] = (t_layout, t_plain)
    return out


def grid_setup(d, sizes, n_alpha, batch, steps, **cfg_kw):
    spec = grid.GridSpec(tuple(np.logspace(-2, 0, n_alpha)), tuple(sizes))
    cfg = grid.TrainConfig(batch_size=batch, **cfg_kw)
    state = grid.init_grid(jax.random.PRNGKey(0), spec, d, cfg)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, d)) / np.sqrt(d)
    return state, xs, cfg


def step_seconds(d, sizes, n_alpha, batch, steps, repeats, **cfg_kw) -> float:
    state, xs, cfg = grid_setup(d, sizes, n_alpha, batch, steps, **cfg_kw)
    return timed(lambda: jax.block_until_ready(grid.run_batches_chunk(state, xs, cfg)),
                 repeats) / steps


@contextlib.contextmanager
def free_matmuls_and_transposes():
    """Inside: the fused step's matmuls return a materialised array of their output's shape
    without computing it, and its transposes return their input reshaped."""
    mm, swap = fused._mm, fused._swap_last

    def fake_mm(eq, a, b, dtype):
        lhs, rest = eq.split(",")
        rhs, out = rest.split("->")
        shape = dict(zip(lhs, a.shape)) | dict(zip(rhs, b.shape))
        seed = a.reshape(-1)[0].astype(F32) + b.reshape(-1)[0].astype(F32)
        return jax.lax.optimization_barrier(jnp.full([shape[c] for c in out], seed, F32))
    fused._mm = fake_mm
    fused._swap_last = lambda a: a.reshape(a.shape[:-2] + a.shape[-1:] + a.shape[-2:-1])
    try:
        yield
    finally:
        fused._mm, fused._swap_last = mm, swap


def breakdown(d, sizes, n_alpha, batch, dtype_name, repeats) -> dict[str, float]:
    """Seconds per step of each part of the fused step, each timed on its own."""
    dtype = jnp.dtype(dtype_name)
    state, xs, cfg = grid_setup(d, sizes, n_alpha, batch, 1, compute_dtype=dtype_name,
                                fused_step=True)
    x = xs[0]
    parts = {"matmuls": sum(a for a, _ in matmul_table(d, sizes, n_alpha, batch, dtype,
                                                        repeats).values())}
    swap = jax.jit(lambda *arrs: [fused._swap_last(a) for a in arrs])
    operands = [x.astype(dtype)] + [rand((n_alpha, m, d), dtype) for m in sizes]
    parts["transposes"] = (timed(lambda: jax.block_until_ready(swap(*operands)), repeats)
                           if dtype == jnp.bfloat16 else 0.0)

    def grads(groups):
        return [fused.group_loss_and_grad(g.params, x, g.l1_coeff, cfg.l1_convention, None,
                                          dtype_name) for g in groups]
    with free_matmuls_and_transposes():
        f = jax.jit(grads)
        parts["elementwise"] = timed(lambda: jax.block_until_ready(f(state.groups)), repeats)
    outs = jax.jit(grads)(state.groups)
    opt = jax.jit(lambda groups, outs: [
        jax.vmap(grid.apply_grads, in_axes=(0, 0, 0, 0, None, None, None, None))(
            g, gr, tot, aux, x, 1.0, cfg, state.step) for g, ((tot, aux), gr) in zip(groups, outs)])
    parts["optimizer"] = timed(lambda: jax.block_until_ready(opt(state.groups, outs)), repeats)
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--sizes", default="256,512,1024,2048")
    p.add_argument("--alphas", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--only", choices=["topk"], help="run only this section")
    p.add_argument("--topk-m", type=int, default=4096, help="latents per cell in the TopK section")
    p.add_argument("--topk-cells", type=int, default=4)
    p.add_argument("--topk-ks", default="", help="k values (default m/32, m/64, m/128)")
    p.add_argument("--topk-no-reference", action="store_true",
                   help="time only the dense and native TopK steps (not XLA's kernels nor BatchTopK: "
                        "minutes per step at LLM-sized dictionaries)")
    a = p.parse_args()
    ks = [int(k) for k in a.topk_ks.split(",")] if a.topk_ks else [a.topk_m // r for r in (32, 64, 128)]
    if a.only == "topk":
        res = dict(machine=machine(), topk=None)
        print(res["machine"])
        res["topk"] = _sparse_step.section(a.d, a.topk_m, a.topk_cells, a.batch, ks, a.steps, a.repeats,
                                          not a.topk_no_reference)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    flops = 10 * a.d * a.alphas * sum(sizes) * a.batch
    gf = lambda sec, fl=flops: fl / sec / 1e9
    res: dict = dict(machine=machine(), d=a.d, sizes=sizes, alphas=a.alphas, batch=a.batch,
                     flops_per_step=flops)
    print(f"{res['machine']}; grid: d {a.d}, sizes {sizes}, {a.alphas} alphas "
          f"({a.alphas * len(sizes)} cells), batch {a.batch}; {flops / 1e9:.1f} GFLOP per step")

    print("\n1. the limit: 2048^3 GEMM, GFLOP/s")
    res["gemm"] = {}
    for dt in ("float32", "bfloat16"):
        x = gf(gemm_seconds(2048, 2048, 2048, jnp.dtype(dt), 2 * a.repeats), 2 * 2048 ** 3)
        t = None if a.no_torch else torch_gemm_rate(2048, dt)
        res["gemm"][dt] = dict(xla=x, torch=t)
        print(f"   {dt:9s} XLA {x:7.0f}   PyTorch " + ("-" if t is None else f"{t:7.0f}"))

    print("\n2. the five matmuls over the grid: our layout | plain 2-D GEMM of the same shape (ms)")
    res["matmuls"] = {}
    for dt in ("float32", "bfloat16"):
        table = matmul_table(a.d, sizes, a.alphas, a.batch, jnp.dtype(dt), a.repeats)
        res["matmuls"][dt] = {k: dict(layout=v[0], plain=v[1]) for k, v in table.items()}
        for name, (lay, plain) in table.items():
            print(f"   {dt:9s} {name:22s} {fused.MATMULS[name]:13s} {lay * 1e3:7.1f} | "
                  f"{plain * 1e3:7.1f}   ({gf(lay, flops / 5):5.0f} | {gf(plain, flops / 5):5.0f} GFLOP/s)")

    print("\n3. the whole step (ms, GFLOP/s)")
    variants = {"float32 autodiff": {}, "float32 fused": dict(fused_step=True),
                "bfloat16 fused": dict(compute_dtype="bfloat16")}
    res["step"] = {}
    for name, kw in variants.items():
        res["step"][name] = s = step_seconds(a.d, sizes, a.alphas, a.batch, a.steps, a.repeats, **kw)
        print(f"   {name:18s} {s * 1e3:8.1f} ms  {gf(s):6.0f} GFLOP/s")

    print("\n4. where the bfloat16 step's time goes (ms per step, each part timed on its own)")
    parts = breakdown(a.d, sizes, a.alphas, a.batch, "bfloat16", a.repeats)
    total = sum(parts.values())
    res["breakdown_bfloat16"] = dict(parts, sum=total, step=res["step"]["bfloat16 fused"])
    for k, v in parts.items():
        print(f"   {k:12s} {v * 1e3:8.1f}")
    print(f"   {'sum':12s} {total * 1e3:8.1f}  = {total / res['step']['bfloat16 fused']:.2f} x "
          "the measured step")

    print("\n5. PyTorch loop, cells one after another (ms, GFLOP/s)")
    res["torch"] = {}
    for name, ac in (("float32", False), ("bfloat16 autocast", True)):
        t = None if a.no_torch else torch_step_seconds(
            a.d, sizes, list(np.logspace(-2, 0, a.alphas)), a.batch, min(a.steps, 5), ac)
        res["torch"][name] = t
        print(f"   {name:18s} " + ("torch not importable" if t is None else
                                   f"{t * 1e3:8.1f} ms  {gf(t):6.0f} GFLOP/s"))

    st, tt = res["step"], res["torch"]
    ratios = {"bf16 step / f32 autodiff step": st["float32 autodiff"] / st["bfloat16 fused"],
              "f32 fused / f32 autodiff": st["float32 autodiff"] / st["float32 fused"],
              "bf16 step / bf16 GEMM limit": gf(st["bfloat16 fused"]) / res["gemm"]["bfloat16"]["xla"],
              "f32 step / f32 GEMM limit": gf(min(st["float32 autodiff"], st["float32 fused"]))
              / res["gemm"]["float32"]["xla"]}
    if tt.get("float32"):
        ratios["f32 step vs PyTorch f32"] = tt["float32"] / min(st["float32 autodiff"], st["float32 fused"])
        ratios["bf16 step vs PyTorch bf16 autocast"] = tt["bfloat16 autocast"] / st["bfloat16 fused"]
    res["ratios"] = ratios
    res["topk"] = _sparse_step.section(a.d, a.topk_m, a.topk_cells, a.batch, ks, a.steps, a.repeats,
                                          not a.topk_no_reference)
    print("\nratios (> 1: sae_jax faster / closer to the limit)")
    for k, v in ratios.items():
        print(f"   {k:36s} {v:5.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
