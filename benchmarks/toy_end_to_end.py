"""Issue 11's end-to-end race, side by side in one run on this machine:

    sae-jax toy --d 256 --features 512 --l1 0.01,0.03,0.1,0.3 --ratios 0.5,1,2,4 --steps 600
        --batch-size 1024 --compute-dtype bfloat16

whole (compile, sampling, training, evaluation, figures, REPORT.md), with an empty compilation
cache and again with it filled, against the float32 PyTorch loop doing only the training steps
of the same 16 cells (per-step time over --torch-steps steps, times 600).

Usage: python benchmarks/toy_end_to_end.py [--steps 600] [--torch-steps 20] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _torch_loop import step_seconds as torch_step_seconds
from grid_step import machine

L1 = "0.01,0.03,0.1,0.3"
RATIOS = "0.5,1,2,4"


def run_cli(out: str, steps: int, dtype: str, cache: str) -> float:
    cmd = ["sae-jax", "toy", "--d", "256", "--features", "512", "--l1", L1, "--ratios", RATIOS,
           "--steps", str(steps), "--batch-size", "1024", "--compute-dtype", dtype,
           "--out", out, "--no-progress"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, SAE_JAX_CACHE_DIR=cache),
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--torch-steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    a = p.parse_args()
    print(machine())
    sizes = [round(float(r) * 512) for r in RATIOS.split(",")]
    alphas = [float(x) for x in L1.split(",")]
    t_torch = torch_step_seconds(256, sizes, alphas, 1024, a.torch_steps, autocast=False, repeats=1)
    if t_torch is None:
        sys.exit("torch is not importable: pip install torch (a CPU build) to race it")
    torch_total = t_torch * a.steps
    print(f"PyTorch float32 loop, training only: {t_torch * 1e3:.1f} ms/step x {a.steps} = {torch_total:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        cold = run_cli(os.path.join(tmp, "cold"), a.steps, a.dtype, cache)
        warm = run_cli(os.path.join(tmp, "warm"), a.steps, a.dtype, cache)
    print(f"sae-jax toy ({a.dtype}), end to end, empty compilation cache: {cold:.1f} s "
          f"({torch_total / cold:.2f}x faster than PyTorch's training alone)")
    print(f"sae-jax toy ({a.dtype}), end to end, cache filled:           {warm:.1f} s "
          f"({torch_total / warm:.2f}x); the cache saves {cold - warm:.1f} s")


if __name__ == "__main__":
    main()
