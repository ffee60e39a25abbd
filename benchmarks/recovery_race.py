"""Time to recovery on the report's world (d 256, h 512, k 5, decay 0.99, ratio 1), side by side
in one run: sae_jax with the fast recipe, sae_jax with the report recipe, and SAELens's
synthetic-data trainer on the same world when `sae_lens` is installed (`pip install -e
'.[bench]'`; see benchmarks/_saelens_race.py for how its L1 coefficient is mapped).

Prints, per alpha, the wall seconds (from the start of each run, compile included) and steps at
which MMCS with the ground truth first reached 0.95 and 0.99, checked every --check-every steps.

    python benchmarks/recovery_race.py [--steps 8000] [--l1 0.1,0.2,0.3] [--check-every 250]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from sae_jax import cli


def race(recipe: str, args: argparse.Namespace, out: str) -> tuple[list[dict], float]:
    t = time.perf_counter()
    code = cli.main(["toy", "--d", "256", "--features", "512", "--mean-active", "5", "--decay", "0.99",
                     "--ratios", "1", "--l1", args.l1, "--recipe", recipe, "--steps", str(args.steps),
                     "--check-every", str(args.check_every), "--out", out, "--no-progress",
                     "--no-figures", "--checkpoint-every", "0"])
    if code:
        raise SystemExit(code)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["cells"], time.perf_counter() - t


def _never(v, unit: str) -> str:
    return "    never" if v is None else f"{v:>7}{unit}"


def print_cell(runner: str, c: dict) -> None:
    print(f"{runner:<16}{c['l1']:>7g}{c['mmcs']:>12.4f}"
          f"{_never(c['seconds_to_0.95'], 's'):>14}{_never(c['seconds_to_0.99'], 's'):>14}"
          f"{_never(c['steps_to_0.95'], ''):>12}{_never(c['steps_to_0.99'], ''):>12}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--l1", default="0.1,0.2,0.3")
    p.add_argument("--check-every", type=int, default=250)
    p.add_argument("--recipes", default="fast,report")
    p.add_argument("--saelens-batch", type=int, default=128)
    p.add_argument("--saelens-lr", type=float, default=3e-3)
    args = p.parse_args()
    print(f"{'runner':<16}{'alpha':>7}{'final MMCS':>12}{'to 0.95':>14}{'to 0.99':>14}"
          f"{'steps 0.95':>12}{'steps 0.99':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            cells, wall = race(recipe, args, os.path.join(tmp, recipe))
            for c in cells:
                print_cell("sae_jax " + recipe, c)
            print(f"{'':<16}whole command: {wall:.1f} s for {args.steps} steps")
    try:
        import _saelens_race
    except ImportError as e:
        print(f"SAELens: not raced ({e}; pip install -e '.[bench]')")
        return
    t = time.perf_counter()
    cells = _saelens_race.race([float(a) for a in args.l1.split(",")], args.steps, args.check_every,
                               batch_size=args.saelens_batch, lr=args.saelens_lr)
    for c in cells:
        print_cell("SAELens", c)
    print(f"{'':<16}whole race: {time.perf_counter() - t:.1f} s for {args.steps} steps "
          f"(batch {args.saelens_batch}, lr {args.saelens_lr:g})")


if __name__ == "__main__":
    main()
