"""AuxK's forms on the SynthSAEBench race grid, side by side in one process.

    python benchmarks/aux_forms.py [--model DIR] [--warm 1000] [--steps 50] [--repeats 4]

The race's 9-cell grid (batchtopk, topk, matryoshka x k 6, 8, 12 at ratio 0.25; the synth recipe,
batch 1,024) on --model (a SAELens-saved model, e.g. the one `benchmarks/synth_race.py --work DIR`
saves in DIR/model: 1,536 features in 128 dimensions, width 384), else on the synth-small preset
(4,096 features in 256 dimensions, width 1,024), is trained --warm steps so that its cells have
the dead latents training gives them; then one chunk of --steps steps is timed from that state,
the variants interleaved (minimum of --repeats), in ms per step:

- forms: AuxK as the grid picks it per step (`Architecture.aux_forms`: none, gathered, dense);
- dense: AuxK always in its dense form (every pre-activation, top-k over the dead latents; the
  TopK family off the sparse decoder);
- off: no AuxK (`aux_k_coeff` 0): the floor.

It also prints the shared sampler's ms per batch and a float32 GEMM's GFLOP/s (the machine's
speed drifts, so compare variants only within one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time

import jax
import numpy as np

from sae_jax import grid, recipes, synth
from sae_jax.architectures import base


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a SAELens-saved synthetic model (default: the synth-small preset)")
    p.add_argument("--warm", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    world = synth.load_saelens(args.model) if args.model else synth.preset("synth-small", seed=42)
    cfg = recipes.train_config("synth", 4000)
    spec = grid.GridSpec.from_ratios([0.0], [0.25], world.f, archs=["batchtopk", "topk", "matryoshka"],
                                     k=(6, 8, 12))
    x0 = grid.sample_inputs(jax.random.PRNGKey(1), world, 4096)
    state = grid.init_grid(jax.random.PRNGKey(0), spec, world.d, cfg, x_init=x0)
    state, _ = grid.run_toy_chunk(state, world, cfg, args.warm)
    dead = [int((np.asarray(g.since_fired) >= cfg.dead_window).sum()) for g in state.groups]
    # "dense" states k_aux (d / 2, the default's value) so that jit traces it anew under the patch
    variants = {"forms": cfg, "off": dataclasses.replace(cfg, aux_k_coeff=0.0),
                "dense": dataclasses.replace(cfg, aux_k=world.d // 2)}
    dense_forms = lambda self, opts, m, d: ((m, opts),)  # noqa: E731
    original = base.Architecture.aux_forms
    chunks = {}
    for name, c in variants.items():
        base.Architecture.aux_forms = dense_forms if name == "dense" else original
        chunks[name] = grid.run_toy_chunk.lower(state, world, c, args.steps).compile()
    base.Architecture.aux_forms = original
    best = {k: np.inf for k in chunks}
    for _ in range(args.repeats):
        for k, f in chunks.items():
            jax.block_until_ready(f(state, world))
            t = time.perf_counter()
            jax.block_until_ready(f(state, world))
            best[k] = min(best[k], time.perf_counter() - t)
    sample = jax.jit(lambda key: grid.sample_inputs(key, world, cfg.batch_size))
    jax.block_until_ready(sample(jax.random.PRNGKey(0)))
    t_s = min(_timed(lambda i=i: sample(jax.random.PRNGKey(i))) for i in range(20))
    a = np.random.default_rng(0).random((1024, 1024), np.float32)
    gemm = 2 * 1024 ** 3 / min(_timed(lambda: a @ a) for _ in range(10)) / 1e9
    print(f"{machine()}; world {world.f} features in {world.d} dimensions, width {spec.dict_sizes[0]}, "
          f"batch {cfg.batch_size}")
    print(f"dead latents per group after {args.warm} steps (window {cfg.dead_window}): {dead}")
    print(f"sampler {t_s * 1e3:.1f} ms per batch; float32 GEMM 1024^3 {gemm:.0f} GFLOP/s")
    for k, v in best.items():
        print(f"{k:<6}{v / args.steps * 1e3:8.1f} ms per step   {best['dense'] / v:5.2f}x the dense form")


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
