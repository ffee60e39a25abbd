"""Grid-step throughput, side by side in one run on this machine:

1. the sae_jax grid step (all cells, one jit), in GFLOP/s, counting 10*d*m FLOPs per sample per
   cell (encoder and decoder forward, their backward; no gradient for x);
2. the roofline: one jitted f32 matmul with the same FLOP count (x_BxD @ W_Dx(sum m));
3. a plain PyTorch loop training the same cells one after another (if torch is importable).

Usage: python benchmarks/grid_step.py [--d 256] [--sizes 256,512,1024,2048] [--alphas 4]
       [--batch 1024] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sae_jax import grid


def timed(fn, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_grid(d, sizes, alphas, batch, steps):
    spec = grid.GridSpec(tuple(np.logspace(-2, 0, alphas)), tuple(sizes))
    cfg = grid.TrainConfig(batch_size=batch)
    state = grid.init_grid(jax.random.PRNGKey(0), spec, d, cfg)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, d)) / np.sqrt(d)

    def run():
        s, m = grid.run_batches_chunk(state, xs, cfg)
        jax.block_until_ready(s)
    return timed(run, 3) / steps


def bench_matmul(d, total_m, batch):
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, d))
    w = jax.random.normal(jax.random.PRNGKey(1), (d, total_m))
    f = jax.jit(lambda x, w: x @ w)
    return timed(lambda: f(x, w).block_until_ready(), 20)


def bench_torch(d, sizes, alphas, batch, steps):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    xs = torch.randn(steps, batch, d) / d ** 0.5
    cells = []
    for m in sizes:
        for a in np.logspace(-2, 0, alphas):
            w_enc = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(m, d)))
            b_enc = torch.nn.Parameter(torch.zeros(m))
            dec = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(m, d)))
            cells.append((float(a), (w_enc, b_enc, dec), torch.optim.Adam([w_enc, b_enc, dec], lr=1e-3)))

    def step(a, params, opt, x):
        w_enc, b_enc, dec = params
        c = torch.relu(x @ w_enc.T + b_enc)
        x_hat = c @ (dec / dec.norm(dim=1, keepdim=True))
        loss = ((x - x_hat) ** 2).mean() + a * c.abs().sum(-1).mean() / c.shape[-1]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run():
        for a, params, opt in cells:  # cell after cell, as SAE libraries do
            for t in range(steps):
                step(a, params, opt, xs[t])
    return timed(run, 2) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--sizes", default="256,512,1024,2048")
    p.add_argument("--alphas", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    total_m = args.alphas * sum(sizes)
    flops = 10 * args.d * total_m * args.batch
    print(f"device: {jax.devices()[0].device_kind}; grid: d={args.d}, sizes={sizes}, "
          f"{args.alphas} alphas ({args.alphas * len(sizes)} cells, {total_m} latents), batch {args.batch}")
    t_grid = bench_grid(args.d, sizes, args.alphas, args.batch, args.steps)
    t_mm = bench_matmul(args.d, total_m, args.batch)
    gf_grid = flops / t_grid / 1e9
    gf_mm = 2 * args.d * total_m * args.batch / t_mm / 1e9
    print(f"sae_jax grid step   : {t_grid * 1e3:8.2f} ms/step  {gf_grid:7.1f} GFLOP/s")
    print(f"matmul roofline     : {t_mm * 1e3:8.2f} ms/call  {gf_mm:7.1f} GFLOP/s")
    print(f"ratio grid/roofline : {gf_grid / gf_mm:.2f}")
    t_torch = bench_torch(args.d, sizes, args.alphas, args.batch, min(args.steps, 5))
    if t_torch is None:
        print("PyTorch loop        : torch not importable (pip install -e '.[bench]')")
    else:
        print(f"PyTorch loop        : {t_torch * 1e3:8.2f} ms/step  {flops / t_torch / 1e9:7.1f} GFLOP/s")
        print(f"speed-up vs PyTorch : {t_torch / t_grid:.2f}x")


if __name__ == "__main__":
    main()
