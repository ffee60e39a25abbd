"""`sae-jax grid`: the SAE grid on stored activations (no ground truth).

Dictionary sizes are given as ratios of the activation width d (`--ratios`) or absolutely
(`--dict-sizes`). Batches stream from the store in the order fixed by (seed, batch size), so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from sae_jax.errors import UsageError


def _open(path: str, tensor: str | None = None):
    """Any input `activations.open_activations` reads: a store, .npy, a .npy directory, a .safetensors tensor."""
    from sae_jax import activations

    try:
        return activations.open_activations(path, tensor)
    except ValueError as e:
        raise UsageError(f"--activations {path}: {str(e).splitlines()[0]}") from None


class _Batches:
    """batches(start_step, T) -> (T, B, d) float32, step k being stream batch k."""

    def __init__(self, store, batch_size: int, seed: int, buffer_rows: int):
        self.store, self.batch_size, self.seed, self.buffer_rows = store, batch_size, seed, buffer_rows
        self.next_step, self.it = None, None

    def __call__(self, start: int, n: int) -> np.ndarray:
        if self.it is None or start != self.next_step:
            self.it = self.store.stream(self.batch_size, self.seed, self.buffer_rows, start_batch=start)
        try:
            out = np.stack([next(self.it) for _ in range(n)])
        except ValueError as e:  # NaN/Inf found while streaming
            raise UsageError(f"--activations: {str(e).splitlines()[0]}") from None
        self.next_step = start + n
        return out


def cmd_grid(args: argparse.Namespace) -> int:
    from sae_jax import cli, grid, plots, report, results, runner

    store = _open(args.activations, args.tensor)
    d = store.d
    if args.steps is None:
        args.steps = 5000
    if args.l1 is None:
        raise UsageError("--l1 is required (a comma list of L1 coefficients)")
    if (args.ratios is None) == (args.dict_sizes is None):
        raise UsageError("give exactly one of --ratios (of the activation width) or --dict-sizes")
    sizes = args.ratios
    if args.dict_sizes is not None:
        if any(m <= 0 or m != int(m) for m in args.dict_sizes):
            raise UsageError(f"--dict-sizes must be positive integers, got {list(args.dict_sizes)}")
        sizes = [m / d for m in args.dict_sizes]
    spec = grid.GridSpec.from_ratios(args.l1, sizes, d, args.seeds or 1)
    cfg = cli.train_config(args, {"batch_size": 256})
    opts = cli.run_options(args, "runs/grid", check_every=0)
    run_config = {"kind": "activations", "activations": os.path.abspath(args.activations),
                  "n_rows": int(store.n), "d": int(d), "grid": runner.to_jsonable(spec),
                  "train": runner.to_jsonable(cfg), "steps": opts.steps, "seed": opts.seed,
                  "eval_samples": opts.eval_samples, "buffer_rows": args.buffer_rows,
                  **({"tensor": args.tensor} if args.tensor else {})}
    batches = _Batches(store, cfg.batch_size, opts.seed, args.buffer_rows)
    state, extra = runner.train_grid(spec, cfg, opts, d, run_config, batches=batches)
    eval_it = store.stream(min(opts.eval_samples, store.n), opts.seed + 1, args.buffer_rows, dtype=np.float32)
    x_eval = next(eval_it)
    cells, dicts, analysis = runner.finish(state, spec, cfg, x_eval, None, extra)
    out = results.write(opts.out, run_config, cells, analysis, dicts, None, extra)
    from sae_jax import export
    export.write_weights(opts.out, state, spec, x_eval)  # weights.safetensors: every cell's full weights
    if not args.no_figures:
        figs = plots.lm_figures(out, os.path.join(opts.out, "figures"))
        notes = []
        if args.compare_toy:
            figs.update(_toy_side_by_side(args.compare_toy, opts.out))
            notes.append(f"The toy figures 4, 9 and 10 from {args.compare_toy} are shown beside "
                         "figures 11-13 for comparison, as in the report.")
        report.write(opts.out, out, figs, "sae-jax grid on stored activations", notes)
    cli._summary(out, opts.out, figures=not args.no_figures)
    return 0


def _toy_side_by_side(toy_dir: str, out: str) -> dict[str, str]:
    names = ("fig04_dead_latents", "fig09_ssll", "fig10_mmcs_with_larger")
    found = {f"toy_{n}": os.path.join(toy_dir, "figures", f"{n}.png") for n in names}
    missing = [p for p in found.values() if not os.path.exists(p)]
    if missing:
        raise UsageError(f"--compare-toy {toy_dir}: missing {missing[0]} (run sae-jax toy there first)")
    return {k: os.path.abspath(v) for k, v in found.items()}


def register(sub) -> None:
    from sae_jax import cli

    p = sub.add_parser("grid", help="train an SAE grid on stored activations")
    p.add_argument("--activations", required=True,
                   help="a store from `sae-jax harvest`, an (n, d) or (batch, tokens, d) .npy, a directory of "
                        ".npy shards, or a .safetensors file (float16, bfloat16 or float32)")
    p.add_argument("--tensor", help="the tensor to read from a .safetensors file with several")
    p.add_argument("--dict-sizes", type=cli.floats, help="comma list of absolute dictionary sizes")
    p.add_argument("--buffer-rows", type=int, default=131072, help="rows shuffled in memory at a time")
    p.add_argument("--compare-toy", help="a toy run directory to show beside figures 11-13")
    cli.add_training_args(p)
    p.set_defaults(func=cmd_grid)
