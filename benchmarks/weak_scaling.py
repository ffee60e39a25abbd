"""Weak scaling of the sharded grid: the grid grows with the device count (cells = base x n),
and the step time should stay flat when the devices are real. Side by side in one run, per n:
step time, cells per second, efficiency t(1)/t(n) and the per-device matmul roofline.

On a CPU, simulate devices (they share the same cores, so this shows the mechanics, not a
speed-up):  JAX_NUM_CPU_DEVICES=8 python benchmarks/weak_scaling.py
On a GPU/TPU host it uses the real devices:   python benchmarks/weak_scaling.py
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from grid_step import timed  # the benchmark beside this one

from sae_jax import grid, sharding


def step_time(n: int, base_alphas: int, sizes: list[int], d: int, batch: int, steps: int) -> float:
    spec = grid.GridSpec(tuple(np.logspace(-2, 0, base_alphas * n)), tuple(sizes))
    cfg = grid.TrainConfig(batch_size=batch)
    mesh = sharding.make_mesh(n)
    state = sharding.shard_state(grid.init_grid(jax.random.PRNGKey(0), spec, d, cfg, pad_multiple=n), mesh)
    xs = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (steps, batch, d)) / np.sqrt(d),
                        sharding.replicated(mesh))
    return timed(lambda: jax.block_until_ready(grid.run_batches_chunk(state, xs, cfg)), 3) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--alphas-per-device", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= jax.device_count()]
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; per device: {args.alphas_per_device} alphas"
          f" x sizes {sizes}, d {args.d}, batch {args.batch}")
    print(f"{'devices':>8}{'cells':>7}{'ms/step':>10}{'cells/s':>10}{'efficiency':>12}")
    t1 = None
    for n in counts:
        t = step_time(n, args.alphas_per_device, sizes, args.d, args.batch, args.steps)
        t1 = t1 or t
        cells = n * args.alphas_per_device * len(sizes)
        print(f"{n:>8}{cells:>7}{t * 1e3:>10.2f}{cells / t:>10.0f}{t1 / t:>12.2f}")


if __name__ == "__main__":
    main()
