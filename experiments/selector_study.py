"""The selector study: does choosing (ratio, alpha) without ground truth hold across worlds?

    python experiments/selector_study.py [--seed 1414] [--worlds 12] [--out DIR] [--steps 2000]
    python experiments/selector_study.py --arch topk --steps 4000     (TopK: a k x ratio grid)

Draws N toy worlds from --seed (d 32; h/d, k/d, lambda^i decay or Zipf exponent, correlation
strength and input noise vary; see `draw_worlds`), trains the report's alpha x ratio grid
(alpha = 10^(j/4), j = -8..4, ratios 0.25..4, the report's recipe) on each with `sae-jax toy`,
then scores every selection rule of `sae_jax.selection` on every world (with --arch topk: the
k x ratio grid of `k_grid` with the fast recipe, and the combined rule as results.py applies it
to TopK, beside its dead-latent form):

- regret = the grid's best MMCS - MMCS of the chosen cell;
- ratio hit = the chosen ratio is within one grid step of the best cell's ratio;
- bound_dead_free (alpha grids) is not a rule but a bound on every rule: the grid's best cell
  among those with no dead latents or at a ratio where every cell has some, i.e. the least regret
  any selector can reach while its cell has no dead latents whenever its ratio has a dead-free
  cell.

Each world's run is kept in DIR/world_NN/ (rerunning skips finished worlds; --rescore only
rescores them), with since_fired.npz, every cell's steps-since-last-fired counters. Writes
DIR/study.json and DIR/STUDY.md (the table, then the combined rule's regrets with the dead count
read at other windows: a diagnostic). The rule was developed on the worlds of --seed 7 and 8
(see REPORT.md); 1414, 2718 and 3141 are held-out study seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from sae_jax import archs, cli, metrics, results, selection

RULES = ("dead_latents", "ssll", "mmcs_with_larger", "combined", "combined_dead_free", "bound_dead_free")
# --arch topk also scores the combined rule with the dead-latent ratio (the rule before fixed-L0
# architectures took their ratio from the live latents)
TOPK_RULES = RULES + ("combined_dead",)
K_FACTORS = (1, 1.5, 2, 3, 4)  # --arch topk: k = round(factor x the world's mean active features)


def k_grid(mean_active: float) -> list[int]:
    """A world's k axis for --arch topk: K_FACTORS times its mean number of active features."""
    return sorted({max(1, round(f * mean_active)) for f in K_FACTORS})


def draw_worlds(seed: int, n: int, d: int = 32, active: tuple[float, float] = (0.03, 0.09),
                uncorrelated: bool = False) -> list[dict]:
    """n world parameter sets: h/d in {1.5, 2, 3}; k/d in `active` ([0.03, 0.09]); half lambda^i
    decay with lambda in [0.97, 1], half Zipf with a in [0.5, 1.1]; correlation strength U(0, 1)
    (0 with `uncorrelated`); input noise 0 for half, U(0.002, 0.02) for the rest."""
    rng = np.random.default_rng(seed)
    worlds = []
    for i in range(n):
        w = {"d": d, "features": int(d * rng.choice([1.5, 2.0, 3.0])),
             "mean_active": round(float(d * rng.uniform(*active)), 2),
             "corr_strength": 0.0 if uncorrelated else round(float(rng.uniform(0, 1)), 2),
             "noise": round(float(rng.uniform(0.002, 0.02)), 3) if rng.random() < 0.5 else 0.0}
        if i % 2:
            w["zipf"] = round(float(rng.uniform(0.5, 1.1)), 2)
        else:
            w["decay"] = round(float(rng.uniform(0.97, 1.0)), 3)
        worlds.append(w)
    return worlds


SINCE_FIRED = "since_fired.npz"


def _keep_since_fired(out: str):
    """Wraps `results.evaluate` so that each cell's steps-since-last-fired counters are saved to
    OUT/since_fired.npz (cell_{i}: (m,) int32): the dead count for any window W <= steps is then
    sum(since_fired >= W), without retraining."""
    inner = results.evaluate

    def evaluate(state, spec, cfg, *args, **kwargs):
        arrays = {f"cell_{c.index}": np.asarray(state.groups[c.group].since_fired[c.slot])
                  for c in spec.cells()}
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, SINCE_FIRED), **arrays)
        return inner(state, spec, cfg, *args, **kwargs)
    return inner, evaluate


def train(world: dict, out: str, seed: int, steps: int, dead_window: int = 10,
          arch: str = "relu_l1") -> None:
    """One world's grid: the report's alpha x ratio grid and recipe (with an L1 warm-up over the
    first fifth), or for topk the k x ratio grid (`k_grid`) with the fast recipe."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in world.items()]
    if arch == "relu_l1":
        flags += ["--l1-warmup", str(steps // 5)]
    else:
        flags += ["--arch", arch, "--k", ",".join(map(str, k_grid(world["mean_active"]))), "--recipe", "fast"]
    inner, results.evaluate = _keep_since_fired(out)
    try:
        rc = cli.main(["toy", *flags, "--steps", str(steps),
                   "--dead-window", str(dead_window),
                   "--seed", str(seed), "--out", out, "--no-appendix", "--no-figures",
                   "--no-progress", "--checkpoint-every", "0", "--check-every", "0"])
    finally:
        results.evaluate = inner
    if rc:
        raise SystemExit(f"world {out} failed with exit code {rc}")


def planes(results: dict) -> dict:
    """The (sparsity x ratio) planes of the per-cell values a rule or the scoring reads ("l1_axis"
    holds the sparsity axis: alpha, or k from dense to sparse)."""
    cells = [c for c in results["cells"] if not c["diverged"]]
    arch = results["cells"][0].get("arch", "relu_l1")
    sk = archs.SPARSITY_KEY[arch]
    l1_axis = sorted({c[sk] for c in results["cells"]}, reverse=arch in archs.TOPK_ARCHS)
    ratio_axis = sorted({c["ratio"] for c in results["cells"]})
    get = lambda key: metrics.plane([np.nan if c.get(key) is None else c[key] for c in cells],
                                    [c[sk] for c in cells], [c["ratio"] for c in cells],
                                    l1_axis, ratio_axis)
    return {"l1_axis": l1_axis, "ratio_axis": ratio_axis, "fixed_l0": arch in archs.TOPK_ARCHS,
            **{k: get(k) for k in ("mmcs", "dead", "ssll", "mmcs_with_larger", "l0", "fvu", "mcc",
                                   "recovered", "redundant", "frac_alive")}}


def picks(p: dict) -> dict:
    """Each rule's (alpha index, ratio index), or None where it makes no suggestion."""
    a, r = p["l1_axis"], p["ratio_axis"]
    planes3 = (p["dead"], p["ssll"], p["mmcs_with_larger"], a, r)
    chosen = {"dead_latents": selection.by_dead_latents(p["dead"], a, r),
              "ssll": selection.by_ssll(p["ssll"], a, r),
              "mmcs_with_larger": selection.by_mmcs_with_larger(p["mmcs_with_larger"], a, r)}
    if p.get("fixed_l0"):  # as results.py reads a topk grid: k carries unchanged, live latents
        chosen["combined"] = selection.suggest(*planes3, size_exponent=0.0, alive_AxR=p["frac_alive"])
        chosen["combined_dead"] = selection.suggest(*planes3, size_exponent=0.0)
    else:  # combined_dead_free: alpha moved off a cell with dead latents (selection.suggest)
        chosen["combined"] = selection.suggest(*planes3)
        chosen["combined_dead_free"] = selection.suggest(*planes3, dead_consistent=True)
    return {k: None if v["ratio"] is None else (a.index(v["l1"]), r.index(v["ratio"]))
            for k, v in chosen.items()}


def score(p: dict) -> dict:
    mm = np.where(np.isfinite(p["mmcs"]), p["mmcs"], -np.inf)
    bi, bj = np.unravel_index(np.argmax(mm), mm.shape)
    row = {"best_mmcs": float(mm[bi, bj]), "best_ratio": p["ratio_axis"][bj],
           "best_l1": p["l1_axis"][int(bi)]}
    chosen = picks(p)
    if not p.get("fixed_l0"):  # the bound: the best cell a dead-consistent selector may pick
        free = np.nan_to_num(p["dead"], nan=np.inf) <= 0
        allowed = np.where(free | ~free.any(axis=0, keepdims=True), mm, -np.inf)
        chosen["bound_dead_free"] = tuple(int(v) for v in np.unravel_index(np.argmax(allowed), mm.shape))
    for rule, ij in chosen.items():
        if ij is None:
            row[rule] = {"regret": None, "ratio_hit": False, "ratio": None, "l1": None, "dead": None}
            continue
        i, j = ij
        row[rule] = {"regret": float(mm[bi, bj] - mm[i, j]), "ratio_hit": bool(abs(j - bj) <= 1),
                     "ratio": p["ratio_axis"][j], "l1": p["l1_axis"][i],
                     **{k: float(p[k][i, j]) for k in ("dead", "l0", "mcc", "recovered", "redundant")}}
    return row


def world_label(w: dict) -> str:
    rates = f"zipf {w['zipf']:g}" if "zipf" in w else f"decay {w['decay']:g}"
    return (f"h/d {w['features'] / w['d']:g}, k/d {w['mean_active'] / w['d']:.3f}, {rates}, "
            f"corr {w['corr_strength']:g}, noise {w['noise']:g}")


def _cell(s: dict) -> str:
    if s["regret"] is None:
        return "–"
    return (f"{s['dead']:.0f}, {s['l0']:.1f}, {s['mcc']:.3f}, {s['recovered']:.2f}, "
            f"{s['redundant']:.0f}")


def table(worlds: list[dict], rows: list[dict]) -> list[str]:
    rules = [r for r in TOPK_RULES if r in rows[0]]
    head = ("| world | best MMCS (ratio, α or k) | " + " | ".join(rules)
            + " | combined cell: dead, L0, MCC, recovered, redundant |")
    lines = [head, "|" + "---|" * (3 + len(rules))]
    for i, (w, row) in enumerate(zip(worlds, rows)):
        cells = []
        for rule in rules:
            s = row[rule]
            cells.append("none" if s["regret"] is None else
                         f"{s['regret']:.4f} ({s['ratio']:g}, {s['l1']:.3g}){'' if s['ratio_hit'] else ' ✗'}")
        lines.append(f"| {i}: {world_label(w)} | {row['best_mmcs']:.4f} ({row['best_ratio']:g}, "
                     f"{row['best_l1']:.3g}) | " + " | ".join(cells) + " | " + _cell(row["combined"]) + " |")
    lines += ["", "| rule | median regret | worst regret | ratio within one step |", "|---|---|---|---|"]
    for rule in rules:
        reg = [r[rule]["regret"] for r in rows]
        ok = [x for x in reg if x is not None]
        worst = "none in some world" if len(ok) < len(reg) else f"{max(ok):.4f}"
        lines.append(f"| {rule} | {np.median(ok) if ok else float('nan'):.4f} | {worst} | "
                     f"{sum(r[rule]['ratio_hit'] for r in rows)}/{len(rows)} |")
    return lines


WINDOWS = (10, 50, 100, 200)  # the sensitivity table's dead windows (steps)


def rescored(out: str, window: int) -> dict | None:
    """The world's score with the dead count read at another window, from its since_fired.npz
    (None when the run did not keep it)."""
    path = os.path.join(out, SINCE_FIRED)
    if not os.path.exists(path):
        return None
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    since = np.load(path)
    for c in res["cells"]:
        c["dead"] = int(np.sum(since[f"cell_{c['index']}"] >= window))
    return score(planes(res))


def sensitivity(outs: list[str], windows: Sequence[int] = WINDOWS) -> list[str]:
    """The combined rule's regrets with the dead count read at each window: a diagnostic of how
    the dead-latent ratio depends on the window, not a rule (the rule uses the run's window)."""
    lines = ["| dead window (steps) | combined: median regret | worst regret | ratio within one step "
             "| picks (ratio, α) |",
             "|---|---|---|---|---|"]
    for w in windows:
        rows = [rescored(o, w) for o in outs]
        if any(r is None for r in rows):
            return []
        reg = [r["combined"]["regret"] for r in rows]
        picks = " ".join(f"{r['combined']['ratio']:g}/{r['combined']['l1']:.3g}" for r in rows)
        lines.append(f"| {w} | {np.median(reg):.4f} | {max(reg):.4f} | "
                     f"{sum(r['combined']['ratio_hit'] for r in rows)}/{len(rows)} | {picks} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1414, help="study seed (1414 held out; 7 for development)")
    ap.add_argument("--worlds", type=int, default=12)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", help="default runs/selector_study, or runs/selector_study_topk with --arch topk")
    ap.add_argument("--dead-window", type=int, default=10,
                    help="a latent is dead when it did not fire in this many final steps")
    ap.add_argument("--rescore", action="store_true", help="only rescore the worlds already trained")
    ap.add_argument("--active", type=float, nargs=2, default=(0.03, 0.09), metavar=("LO", "HI"),
                    help="range of the worlds' mean active features per dimension (k/d)")
    ap.add_argument("--uncorrelated", action="store_true", help="worlds without feature correlation")
    ap.add_argument("--arch", choices=("relu_l1", "topk"), default="relu_l1",
                    help="topk: the k x ratio grid (k = 1-4x the world's mean active features) "
                         "with the fast recipe")
    args = ap.parse_args(argv)
    args.out = args.out or ("runs/selector_study" + ("_topk" if args.arch == "topk" else ""))
    worlds = draw_worlds(args.seed, args.worlds, args.d, tuple(args.active), args.uncorrelated)
    t0, rows, done, outs, load0 = time.perf_counter(), [], [], [], os.getloadavg()
    for i, w in enumerate(worlds):
        out = os.path.join(args.out, f"world_{i:02d}")
        if not os.path.exists(os.path.join(out, "results.json")):
            if args.rescore:
                continue
            t = time.perf_counter()
            train(w, out, seed=args.seed * 1000 + i, steps=args.steps, dead_window=args.dead_window,
                  arch=args.arch)
            with open(os.path.join(out, "results.json")) as f:
                trained = json.load(f).get("train_seconds", float("nan"))
            print(f"world {i} ({world_label(w)}): {time.perf_counter() - t:.0f} s "
                  f"({trained:.0f} s training)", flush=True)
        with open(os.path.join(out, "results.json")) as f:
            rows.append(score(planes(json.load(f))))
        done.append(w)
        outs.append(out)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    lines = table(done, rows)
    windows = sensitivity(outs)
    if windows:
        lines += ["", "The combined rule with the dead count read at other windows (a diagnostic):", "",
                  *windows]
    os.makedirs(args.out, exist_ok=True)
    previous = os.path.join(args.out, "study.json")
    if args.rescore and os.path.exists(previous):  # keep the training run's wall time
        with open(previous) as f:
            wall = json.load(f).get("wall_seconds", wall)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump({"seed": args.seed, "steps": args.steps, "worlds": done, "rows": rows,
                   "wall_seconds": round(wall, 1), "load_average_start_end": [load0, load1]},
                  f, indent=1)
    with open(os.path.join(args.out, "STUDY.md"), "w") as f:
        f.write("\n".join([f"# Selector study (seed {args.seed}, {len(done)} worlds, {args.steps} steps)",
                           "", *lines, ""]))
    print("\n".join(lines))
    print(f"wall {wall:.0f} s; load average (1, 5, 15 min) at start {load0}, at end {load1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
