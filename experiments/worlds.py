"""Which of the report's suspected differences make the toy diagnostics look like the LM's?

    python experiments/worlds.py [--out DIR] [--steps 2000] [--d 32]

On the language model the report saw dead latents in every cell of the grid and MMCS with
larger dictionaries never above ~0.6; on its toy data neither. This trains an alpha x ratio grid
(alpha = 10^(j/2), j = -4..2, every other value of the report's; ratios 0.25..4) on a base world
(d 32, h/d 2, k/d 0.05, the report's decay and correlation)
and on one variant per suspected difference:

- noise: Gaussian input noise, std 0.02 per dimension;
- jitter: every active feature's direction tilted by theta ~ N(0, 0.3^2) rad per sample;
- nonneg: feature directions in the positive orthant;
- superposition: h/d 6 instead of 2;
- weak correlation: correlation strength 0;
- all: every one of the above at once.

For each it reports the share of cells with dead latents, the share of alphas at which every
ratio has dead latents, the highest MMCS with larger dictionaries, and the best MMCS with the
ground truth; writes DIR/worlds.json, DIR/WORLDS.md and DIR/worlds.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from sae_jax import cli

VARIANTS: dict[str, dict] = {
    "base": {},
    "noise": {"noise": 0.02},
    "jitter": {"jitter": 0.3},
    "nonneg": {"nonneg": True},
    "superposition": {"features_per_d": 6},
    "weak correlation": {"corr_strength": 0.0},
    "all": {"noise": 0.02, "jitter": 0.3, "nonneg": True, "features_per_d": 6, "corr_strength": 0.0},
}


def flags(variant: dict, d: int) -> list[str]:
    v = dict(variant)
    out = [f"--d={d}", f"--features={int(d * v.pop('features_per_d', 2))}",
           f"--mean-active={0.05 * d:g}"]
    for k, val in v.items():
        out.append(f"--{k.replace('_', '-')}" if val is True else f"--{k.replace('_', '-')}={val}")
    return out


def summarise(res: dict) -> dict:
    cells = [c for c in res["cells"] if not c["diverged"]]
    alphas = sorted({c["l1"] for c in cells})
    all_dead = [a for a in alphas if all(c["dead"] > 0 for c in cells if c["l1"] == a)]
    larger = [c["mmcs_with_larger"] for c in cells if c.get("mmcs_with_larger") is not None]
    return {"cells_with_dead": sum(c["dead"] > 0 for c in cells) / len(cells),
            "alphas_all_dead": len(all_dead) / len(alphas),
            "max_mmcs_with_larger": max(larger), "best_mmcs": max(c["mmcs"] for c in cells),
            "best_mcc": max(c["mcc"] for c in cells if c.get("mcc") is not None)}


def figure(rows: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("cells_with_dead", "max_mmcs_with_larger", "best_mmcs"),
                              ("share of cells with dead latents", "max MMCS with larger", "best MMCS (ground truth)")):
        ax.barh(names, [rows[n][key] for n in names])
        ax.set_title(title)
        ax.invert_yaxis()
    axes[1].axvline(0.6, color="k", ls="--", lw=1, label="LM: never above ~0.6")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/worlds")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--only", help="comma list of variants (default: all)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    t0, rows = time.perf_counter(), {}
    for name in names:
        out = os.path.join(args.out, name.replace(" ", "_"))
        if not os.path.exists(os.path.join(out, "results.json")):
            rc = cli.main(["toy", *flags(VARIANTS[name], args.d), "--steps", str(args.steps),
                           "--l1", ",".join(f"{10 ** (j / 2):.4g}" for j in range(-4, 3)),
                           "--l1-warmup", str(args.steps // 5), "--out", out, "--no-appendix",
                           "--no-figures", "--no-progress", "--checkpoint-every", "0",
                           "--check-every", "0"])
            if rc:
                return rc
        with open(os.path.join(out, "results.json")) as f:
            rows[name] = summarise(json.load(f))
        print(name, rows[name], flush=True)
    lines = ["| world | cells with dead latents | alphas dead at every ratio | max MMCS with larger "
             "| best MMCS | best MCC |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['cells_with_dead']:.2f} | {r['alphas_all_dead']:.2f} | "
                     f"{r['max_mmcs_with_larger']:.3f} | {r['best_mmcs']:.3f} | {r['best_mcc']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "worlds.json"), "w") as f:
        json.dump({"variants": {n: VARIANTS[n] for n in rows}, "rows": rows, "steps": args.steps,
                   "d": args.d, "wall_seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    with open(os.path.join(args.out, "WORLDS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(rows, os.path.join(args.out, "worlds.png"))
    print("\n".join(lines))
    print(f"wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
