"""Shared by the experiment scripts: parse --preset/--out and run `sae-jax toy` with a grid."""

from __future__ import annotations

import argparse
import sys

from sae_jax import cli


def run(name: str, doc: str, grid_args: list[str]) -> int:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--preset", choices=("small", "paper"), default="small")
    p.add_argument("--out", default=f"runs/experiments/{name}")
    args, extra = p.parse_known_args()
    return cli.main(["toy", "--preset", args.preset, "--out", args.out, *grid_args, *extra])


if __name__ == "__main__":
    sys.exit("run one of the experiment scripts beside this file")
