"""The `sae-jax` command: parsers, and handlers that map arguments onto the library's
dataclasses (`recipes`, `grid.GridSpec`, `run.RunOptions`) and call `run.run`. Input errors
print one line and exit with status 2; library errors name fields, shown here as flags."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from sae_jax.errors import UsageError

# Field names (dataclass fields, as library errors name them) whose flag is not --field-name.
FLAGS = {"l1_coeff": "--l1", "l0_coeff": "--l0", "b1": "--adam-b1", "b2": "--adam-b2"}

# Training fields with a flag (TrainConfig's and ResampleConfig's, as recipes name them).
TRAIN_FIELDS = ("batch_size", "lr", "b1", "b2", "lr_warmup", "lr_decay_steps", "l1_warmup",
                "tied_init", "l1_convention", "dead_window", "resample_every", "resample_pool",
                "resample_worst", "resample_dead_window", "dedup_threshold",
                "resample_encoder_scale", "resample_until", "compute_dtype", "fused_step",
                "aux_k_coeff", "aux_k", "jumprelu_bandwidth", "init_threshold", "threshold_decay",
                "sparse_decoder")


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _dest(field: str) -> str:
    return flag(field)[2:].replace("-", "_")


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


def ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers."""
    vals = floats(text)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return tuple(int(v) for v in vals)


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of architecture names."""
    from sae_jax import archs

    vals = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [v for v in vals if v not in archs.ARCHS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(archs.ARCHS)}, got {text!r}")
    return vals


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every grid-training command (toy and grid)."""
    g = p.add_argument_group("grid")
    g.add_argument("--l1", type=floats, help="comma list of L1 coefficients alpha")
    g.add_argument("--ratios", type=floats, help="comma list of dictionary size / features")
    g.add_argument("--seeds", type=int, help="SAE initialisations per cell (default 1)")
    g.add_argument("--arch", type=names, default=None,
                   help="comma list of architectures: relu_l1 (default, the report's), topk, batchtopk, jumprelu")
    g.add_argument("--k", type=ints, help="comma list of k (active latents) for topk and batchtopk")
    g.add_argument("--l0", type=floats, help="comma list of L0 coefficients lambda for jumprelu")
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
    t.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="matmul operands (float32 accumulation; weights, Adam, loss stay float32)")
    t.add_argument("--fused-step", action="store_true", default=None,
                   help="the group's gradients by hand in fast layouts (always on in bfloat16)")
    a = p.add_argument_group("architectures other than relu_l1")
    a.add_argument("--aux-k-coeff", type=float, help="AuxK dead-latent loss coefficient (default: "
                   "Gao et al.'s 1/32 for topk and batchtopk without resampling, else off; 0: off)")
    a.add_argument("--aux-k", type=int, help="AuxK's k_aux (default d/2)")
    a.add_argument("--jumprelu-bandwidth", type=float, help="JumpReLU straight-through kernel width")
    a.add_argument("--init-threshold", type=float, help="JumpReLU's initial threshold")
    a.add_argument("--threshold-decay", type=float, help="BatchTopK threshold average decay")
    a.add_argument("--sparse-decoder", choices=("auto", "on", "off"),
                   help="topk and batchtopk groups through the sparse gather/scatter decoder: auto "
                        "(default: on the CPU with the native kernels; without them topk where "
                        "k <= m/64), on, off; never with AuxK")
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
    o.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (a larger --steps extends the run)")
    o.add_argument("--check-every", type=int, default=250, help="MMCS recovery checks (toy)")
    o.add_argument("--eval-samples", type=int, default=8192)
    o.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    o.add_argument("--distributed", action="store_true",
                   help="one process of several: jax.distributed.initialize() (README: several hosts)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--no-figures", action="store_true")


def _train_overrides(args: argparse.Namespace) -> dict:
    return {f: getattr(args, _dest(f)) for f in TRAIN_FIELDS}


def _run_options(args: argparse.Namespace, default_out: str, steps: int, overrides: dict):
    from sae_jax import recipes, run

    return run.RunOptions(
        out=args.out or default_out, steps=steps, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, check_every=args.check_every,
        eval_samples=args.eval_samples, progress=not args.no_progress, devices=args.devices,
        figures=not args.no_figures, derived_from_steps=recipes.derived_from_steps(args.recipe, overrides))


def cmd_toy(args: argparse.Namespace) -> int:
    from sae_jax import grid, recipes, run, toy

    preset = recipes.PRESETS[args.preset]
    pick = lambda name, field=None: getattr(preset, field or name) if getattr(args, name) is None else getattr(args, name)
    steps = pick("steps")
    world = toy.ToyConfig(d=pick("d"), features=pick("features"), mean_active=pick("mean_active"),
                          decay=pick("decay"), correlated=not args.no_correlation,
                          fresh_z=not args.fixed_z, corr_strength=args.corr_strength,
                          zipf=args.zipf, hierarchy=args.hierarchy, nonneg=args.nonneg,
                          jitter=args.jitter, noise=args.noise).validate()
    spec = grid.GridSpec.from_ratios(pick("l1", "l1_coeff"), pick("ratios"), world.features, pick("seeds"),
                                     world_axis=args.world_axis or "", world_values=args.world_values or (),
                                     **_arch_axes(args))
    overrides = _train_overrides(args)
    train = recipes.train_config(args.recipe, steps, overrides, preset)
    custom = any(getattr(args, k) is not None for k in ("d", "features", "l1", "ratios", "arch"))
    appendix = args.appendix or not (args.no_appendix or custom)
    data = run.ToyData(world, preset.denoise_noise if appendix else (), min(preset.denoise_steps, steps))
    opts = _run_options(args, f"runs/toy-{args.preset}", steps, overrides)
    _summary(run.run(spec, train, opts, data), opts.out, opts.figures and not spec.world_axis)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from sae_jax import grid, recipes, run

    data = run.StoreData.open(args.activations, args.buffer_rows, args.tensor)
    d = data.store.d
    steps = 5000 if args.steps is None else args.steps
    axes = _arch_axes(args)
    if args.l1 is None and "relu_l1" in axes["archs"]:
        raise UsageError("--l1 is required (a comma list of L1 coefficients)")
    if (args.ratios is None) == (args.dict_sizes is None):
        raise UsageError("give exactly one of --ratios (of the activation width) or --dict-sizes")
    sizes = args.ratios
    if args.dict_sizes is not None:
        if any(m <= 0 or m != int(m) for m in args.dict_sizes):
            raise UsageError(f"--dict-sizes must be positive integers, got {list(args.dict_sizes)}")
        sizes = [m / d for m in args.dict_sizes]
    spec = grid.GridSpec.from_ratios(args.l1 or (), sizes, d, args.seeds or 1, **axes)
    overrides = _train_overrides(args)
    train = recipes.train_config(args.recipe, steps, overrides)
    opts = _run_options(args, "runs/grid", steps, overrides)
    _summary(run.run(spec, train, opts, data, compare_toy=args.compare_toy), opts.out, opts.figures)
    return 0


def _arch_axes(args: argparse.Namespace) -> dict:
    """GridSpec's architecture fields from --arch, --k and --l0."""
    archs = args.arch or ("relu_l1",)
    return {"archs": archs, "k": args.k or (), "l0_coeff": args.l0 or ()}


def _summary(out: dict, path: str, figures: bool) -> None:
    import jax

    if jax.process_index() != 0:  # process 0 wrote the outputs and says so
        return
    print(f"wrote {path}/results.json, dictionaries.npz" + (", REPORT.md and figures/" if figures else ""))
    worlds = out.get("by_world_value")
    if not worlds:
        _print_selection(out, "")
    for b in worlds or []:  # a world axis: one selection per value
        _print_selection(b, f"{out['config']['grid']['world_axis']} {b['world_value']:g}: ")


def _print_selection(res: dict, head: str) -> None:
    """The best cell and the suggestion, per architecture (each with its sparsity setting)."""
    from sae_jax import archs

    one = {"suggested": res.get("suggested"), "ground_truth_optimum": res.get("ground_truth_optimum")}
    for a, r in (res.get("by_arch") or {"": one}).items():
        s, opt = r.get("suggested") or {}, r.get("ground_truth_optimum")
        arch = s.get("arch") or "relu_l1"
        key, name = archs.SPARSITY_KEY[arch], archs.SPARSITY_NAME[arch]
        pre = head + (f"{a}: " if a else "")
        if opt:
            print(f"{pre}best MMCS {opt['mmcs']:.4f} at ratio {opt['ratio']:g}, {name} {opt[key]:.3g}")
        if s.get("ratio") is not None:
            print(f"{pre}suggested without ground truth: ratio {s['ratio']:g}, {name} {s[key]:.3g} ({s['summary']})")


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
    w.add_argument("--world-axis", help="sweep one world knob across the grid: noise, jitter or "
                   "corr_strength (every value in the same compiled step; README: a world axis)")
    w.add_argument("--world-values", type=floats, help="comma list of the --world-axis knob's values")
    w.add_argument("--no-appendix", action="store_true",
                   help="skip the denoising appendix grid (skipped anyway for a custom world or grid)")
    w.add_argument("--appendix", action="store_true", help="run the denoising appendix grid even so")
    add_training_args(p)
    p.set_defaults(func=cmd_toy)

    p = sub.add_parser("grid", help="train an SAE grid on stored activations")
    p.add_argument("--activations", required=True,
                   help="a store from `sae-jax harvest`, an (n, d) or (batch, tokens, d) .npy, a directory of "
                        ".npy shards, or a .safetensors file (float16, bfloat16 or float32)")
    p.add_argument("--tensor", help="the tensor to read from a .safetensors file with several")
    p.add_argument("--dict-sizes", type=floats, help="comma list of absolute dictionary sizes")
    p.add_argument("--buffer-rows", type=int, default=131072, help="rows shuffled in memory at a time")
    p.add_argument("--compare-toy", help="a toy run directory to show beside figures 11-13")
    add_training_args(p)
    p.set_defaults(func=cmd_grid)

    from sae_jax import cli_lm  # train-lm and harvest

    cli_lm.register(sub)
    from sae_jax import cli_export
    cli_export.register(sub)
    return parser


_ABSL_ERROR = re.compile(r"^[EF]\d{4} \d\d:\d\d:\d\d")


def _supervise() -> int | None:
    """With --distributed, the work runs in a forked child whose stderr passes through here.
    When JAX's coordination service stops the child because another process died (a C++
    abort with a long log), that log is held back and one line is printed instead. Returns
    the exit status in the parent, None in the child."""
    import signal

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: dies with its parent, and writes its stderr into the pipe
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.close(read_fd)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        return None
    os.close(write_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child, which reports it
    held, said = False, False
    with os.fdopen(read_fd, "r", errors="replace") as pipe:
        for line in pipe:
            held = held or bool(_ABSL_ERROR.match(line))
            if not held or (line.startswith("sae-jax: error:") and not said):
                said = said or line.startswith("sae-jax: error:")
                sys.stderr.write(line)
                sys.stderr.flush()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if held and status != 0:
        if not said:
            rank = os.environ.get("JAX_PROCESS_ID", "?")
            print(f"sae-jax: error: process {rank} stopped: another process of the run died or cannot "
                  "be reached (rerun all with --resume)", file=sys.stderr)
        return 1
    return status if status >= 0 else 128 - status


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="sae-jax: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "--distributed" in argv and os.name == "posix" and "jax" not in sys.modules:
        status = _supervise()  # before the parser, which imports jax
        if status is not None:
            return status
    args = build_parser().parse_args(argv)
    from sae_jax import compile_cache
    compile_cache.enable()
    try:
        if getattr(args, "distributed", False):
            from sae_jax import sharding
            sharding.initialize_distributed()
        return args.func(args)
    except UsageError as e:
        print(f"sae-jax: error: {e.render(flag)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sae-jax: interrupted; the newest checkpoint is kept: rerun with --resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if not getattr(args, "distributed", False):
            raise
        # Most often another process died; exit now, skipping a shutdown that waits for it.
        import jax
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"sae-jax: error: process {jax.process_index()} of {jax.process_count()} stopped "
              f"(another process may have died; rerun all with --resume): {first}", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
