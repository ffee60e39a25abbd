"""The `sae-jax` command. Input errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TYPE_CHECKING

from sae_jax.errors import UsageError

if TYPE_CHECKING:
    from sae_jax import grid, runner


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers."""
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every grid-training command (toy and grid)."""
    g = p.add_argument_group("grid")
    g.add_argument("--l1", type=floats, help="comma list of L1 coefficients alpha")
    g.add_argument("--ratios", type=floats, help="comma list of dictionary size / features")
    g.add_argument("--seeds", type=int, help="SAE initialisations per cell (default 1)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--l1-convention", choices=("report", "sum"), default="report")
    t.add_argument("--seed", type=int, default=0, help="master PRNG seed")
    t.add_argument("--recipe", choices=("report", "fast"), default=None,
                   help="report: Adam 1e-3 (default); fast: issue-7 recipe with resampling")
    t.add_argument("--adam-b1", type=float)
    t.add_argument("--adam-b2", type=float)
    t.add_argument("--lr-warmup", type=int)
    t.add_argument("--lr-decay-steps", type=int, help="cosine decay to 0 over this many steps")
    t.add_argument("--l1-warmup", type=int)
    t.add_argument("--tied-init", action=argparse.BooleanOptionalAction, default=None,
                   help="start the encoder as the decoder, W_e = D (on in --recipe fast)")
    t.add_argument("--dead-window", type=int, default=10)
    r = p.add_argument_group("resampling (on in --recipe fast)")
    r.add_argument("--resample-every", type=int)
    r.add_argument("--resample-pool", type=int,
                   help="K: the pool keeps each of the last K steps' worst-reconstructed input "
                        "(default: the period)")
    r.add_argument("--resample-worst", type=int,
                   help="new atoms come from the pool's n currently worst (default: all)")
    r.add_argument("--resample-dead-window", type=int)
    r.add_argument("--dedup-threshold", type=float)
    r.add_argument("--resample-encoder-scale", type=float,
                   help="new encoder row = scale x direction x mean live row norm (default 1)")
    r.add_argument("--resample-until", type=int, help="last step that may resample")
    o = p.add_argument_group("run")
    o.add_argument("--out", default=None, help="output directory")
    o.add_argument("--checkpoint-every", type=int, default=1000, help="0 turns checkpoints off")
    o.add_argument("--keep-checkpoints", type=int, default=3)
    o.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    o.add_argument("--check-every", type=int, default=250, help="MMCS recovery checks (toy)")
    o.add_argument("--eval-samples", type=int, default=8192)
    o.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    o.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--no-figures", action="store_true")


def train_config(args: argparse.Namespace, preset: dict) -> "grid.TrainConfig":
    """The recipe's values, then the preset's batch size, then any explicit flag."""
    from sae_jax import grid, toyrun

    recipe = dict(toyrun.RECIPES[args.recipe or "report"])
    # Step counts a recipe gives as fractions of the run: "<field>_frac" -> field.
    fracs = {"resample_until": recipe.pop("resample_until_frac", 0.0),
             "lr_decay_steps": recipe.pop("lr_decay_frac", 0.0)}
    values = {"batch_size": preset.get("batch_size", 256), **recipe}
    if args.recipe is None:  # the preset's own additions to the report's recipe
        values.update(preset.get("report_recipe_extras", {}))
    flags = {"batch_size": args.batch_size, "lr": args.lr, "b1": args.adam_b1, "b2": args.adam_b2,
             "lr_warmup": args.lr_warmup, "lr_decay_steps": args.lr_decay_steps,
             "l1_warmup": args.l1_warmup, "resample_every": args.resample_every,
             "resample_pool": args.resample_pool, "resample_worst": args.resample_worst,
             "resample_dead_window": args.resample_dead_window,
             "dedup_threshold": args.dedup_threshold, "resample_until": args.resample_until,
             "resample_encoder_scale": args.resample_encoder_scale, "tied_init": args.tied_init}
    values.update({k: v for k, v in flags.items() if v is not None})
    for field, frac in fracs.items():
        if field not in values and frac:
            values[field] = int(frac * args.steps)
    for k in ("lr", "b1", "b2", "dedup_threshold"):
        if not math.isfinite(values.get(k, 0.0)):
            raise UsageError(f"--{k.replace('_', '-')} must be finite, got {values[k]}")
    return grid.TrainConfig(l1_convention=args.l1_convention, dead_window=args.dead_window,
                            **values).validate()


def run_options(args: argparse.Namespace, default_out: str, **kw) -> "runner.RunOptions":
    from sae_jax import runner

    values = dict(out=args.out or default_out, steps=args.steps, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                  resume=args.resume, check_every=args.check_every, eval_samples=args.eval_samples,
                  progress=not args.no_progress, devices=args.devices)
    return runner.RunOptions(**{**values, **kw}).validate()


def cmd_toy(args: argparse.Namespace) -> int:
    from sae_jax import grid, toy, toyrun

    preset = toyrun.PRESETS[args.preset]
    pick = lambda name: preset[name] if getattr(args, name) is None else getattr(args, name)
    args.steps = pick("steps")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    world = toy.ToyConfig(d=pick("d"), features=pick("features"), mean_active=pick("mean_active"),
                          decay=pick("decay"), correlated=not args.no_correlation,
                          fresh_z=not args.fixed_z, corr_strength=args.corr_strength,
                          zipf=args.zipf, hierarchy=args.hierarchy, nonneg=args.nonneg,
                          jitter=args.jitter, noise=args.noise,
                          noise_targets=args.noise_targets).validate()
    spec = grid.GridSpec.from_ratios(pick("l1"), pick("ratios"), world.features, pick("seeds"))
    cfg = train_config(args, preset)
    custom = any(getattr(args, k) is not None for k in ("d", "features", "l1", "ratios"))
    appendix = args.appendix or not (args.no_appendix or custom)
    run = toyrun.ToyRun(world, spec, cfg, run_options(args, f"runs/toy-{args.preset}"),
                        denoise_noise=preset["denoise_noise"] if appendix else (),
                        denoise_steps=min(preset["denoise_steps"], args.steps))
    out = toyrun.run(run, figures=not args.no_figures)
    _summary(out, run.opts.out, figures=not args.no_figures)
    return 0


def _summary(out: dict, path: str, figures: bool) -> None:
    s = out.get("suggested") or {}
    opt = out.get("ground_truth_optimum")
    print(f"wrote {path}/results.json, dictionaries.npz" + (", REPORT.md and figures/" if figures else ""))
    if opt:
        print(f"best MMCS {opt['mmcs']:.4f} at ratio {opt['ratio']:g}, alpha {opt['l1']:.3g}")
    if s.get("ratio") is not None:
        print(f"suggested without ground truth: ratio {s['ratio']:g}, alpha {s['l1']:.3g} ({s['summary']})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-jax", description="Sparse autoencoder grids in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("toy", help="the report's toy reproduction")
    w = p.add_argument_group("toy world")
    w.add_argument("--preset", choices=("small", "paper"), default="small")
    w.add_argument("--d", type=int)
    w.add_argument("--features", type=int)
    w.add_argument("--mean-active", type=float)
    w.add_argument("--decay", type=float)
    w.add_argument("--no-correlation", action="store_true")
    w.add_argument("--fixed-z", action="store_true", help="one z per world (the report) instead of per batch")
    w.add_argument("--corr-strength", type=float, default=1.0,
                   help="C = (1-s) I + s C_random: 0 independent firing, 1 the report (default)")
    w.add_argument("--zipf", type=float, default=0.0, help="base rates (i+1)^-a instead of decay^i")
    w.add_argument("--hierarchy", type=int, default=0,
                   help="c children per parent; a child fires only with its parent")
    w.add_argument("--nonneg", action="store_true", help="non-negative feature directions")
    w.add_argument("--jitter", type=float, default=0.0,
                   help="per-sample angle std (radians) of each feature's direction")
    w.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std added to every sampled x")
    w.add_argument("--noise-targets", action="store_true", help="toy.sample_with_target returns the noisy input as target too (grid training autoencodes the sampled, noisy x either way)")
    w.add_argument("--no-appendix", action="store_true",
                   help="skip the denoising appendix grid (skipped anyway for a custom world or grid)")
    w.add_argument("--appendix", action="store_true", help="run the denoising appendix grid even so")
    add_training_args(p)
    p.set_defaults(func=cmd_toy)
    from sae_jax import cli_lm, grid_cli  # the other subcommands

    grid_cli.register(sub)
    cli_lm.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="sae-jax: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "distributed", False):
            from sae_jax import sharding
            sharding.initialize_distributed()
        return args.func(args)
    except UsageError as e:
        print(f"sae-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sae-jax: interrupted; the newest checkpoint is kept: rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
