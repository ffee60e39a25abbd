"""The language-model half, end to end: train the byte-level transformer, harvest the MLP
activations of layer 1 into an on-disk store, and train the SAE grid on them (figures 11-13,
the suggestion without ground truth, and the toy figures side by side when --compare-toy is
given). Each stage is skipped when its output already exists, so a killed chain can be rerun.

    python experiments/lm_chain.py [--preset cpu|paper] [--out DIR] [--corpus PATH] [--compare-toy DIR]

cpu (default): the report's 6-layer, d_model 256 model for 500 steps on the Python docs that ship
with CPython, 262k harvested tokens, a 5 x 4 grid (dictionary 0.25-2 x the MLP width 1024),
1000 SAE steps; about 15 minutes on 2 CPU cores. paper: longer LM training, 2M tokens, ratios up
to 8 and 10k SAE steps, for a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import run_stages

CHAIN_PRESETS = {
    "cpu": dict(lm=["--preset", "cpu"], tokens="262144", l1="0.03,0.1,0.3,1,3",
                ratios="0.25,0.5,1,2", steps="1000", batch="128"),
    "paper": dict(lm=["--preset", "paper"], tokens="2097152", l1="0.01,0.03,0.1,0.3,1,3,10",
                  ratios="0.25,0.5,1,2,4,8", steps="10000", batch="256"),
}


def _has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(CHAIN_PRESETS), default="cpu")
    p.add_argument("--out", default="runs/lm_chain")
    p.add_argument("--corpus", help="a text file, a directory of .txt files, or .jsonl (default: Python docs)")
    p.add_argument("--layer", default="1")
    p.add_argument("--compare-toy", help="a `sae-jax toy` output directory to show beside figures 11-13")
    args = p.parse_args()
    pre = CHAIN_PRESETS[args.preset]
    model, store, grid_out = (os.path.join(args.out, n) for n in ("model", "store", "grid"))
    corpus = ["--corpus", args.corpus] if args.corpus else []
    stages = [
        (os.path.join(model, "config.json"),
         ["train-lm", "--out", model, *pre["lm"], *corpus,
          *(["--resume"] if _has_checkpoint(os.path.join(model, "train_checkpoints")) else [])]),
        (os.path.join(store, "manifest.json"),
         ["harvest", "--model", model, "--layer", args.layer, "--out", store, "--max-tokens", pre["tokens"]]),
        (os.path.join(grid_out, "results.json"),
         ["grid", "--activations", store, "--l1", pre["l1"], "--ratios", pre["ratios"],
          "--steps", pre["steps"], "--batch-size", pre["batch"], "--out", grid_out,
          *(["--resume"] if _has_checkpoint(os.path.join(grid_out, "checkpoints", "grid")) else []),
          *(["--compare-toy", args.compare_toy] if args.compare_toy else [])]),
    ]
    code = run_stages("lm_chain", stages)
    if code:
        return code
    print(f"[lm_chain] report: {os.path.join(grid_out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
