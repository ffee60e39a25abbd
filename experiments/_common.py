"""Shared by the experiment scripts: parse --preset/--out and run `sae-jax toy` with a grid (`run`);
run a chain of `sae-jax` stages, each skipped when its output exists (`run_stages`)."""

from __future__ import annotations

import argparse
import os
import sys

from sae_jax import cli


def run(name: str, doc: str, grid_args: list[str]) -> int:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--preset", choices=("small", "paper"), default="small")
    p.add_argument("--out", default=f"runs/experiments/{name}")
    args, extra = p.parse_known_args()
    return cli.main(["toy", "--preset", args.preset, "--out", args.out, *grid_args, *extra])


def run_stages(tag: str, stages: list[tuple[str, list[str]]]) -> int:
    """Run each (done, argv) as `sae-jax argv` in order, skipping one whose output `done` exists,
    so a killed chain can be rerun; the first nonzero exit code stops the chain and is returned."""
    for done, argv in stages:
        if os.path.exists(done):
            print(f"[{tag}] {argv[0]}: {done} exists, skipping")
            continue
        print(f"[{tag}] sae-jax {' '.join(argv)}", flush=True)
        code = cli.main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit("run one of the experiment scripts beside this file")
