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

# Grid axes (GridSpec fields, as library errors name them) whose flag is not --field-name; the
# training and run options' flags come from their dataclasses (`knobs`, `_knob_flags`).
FLAGS = {"l1_coeff": "--l1", "l0_coeff": "--l0", "arch_options": "--arch-option"}


def _knob_flags() -> tuple[list, list]:
    """(the training options' flags: TrainConfig's and ResampleConfig's under the names recipes
    use, the run options' flags)."""
    from sae_jax import knobs, resample, run
    from sae_jax.config import TrainConfig

    by_field = {v: k for k, v in resample.FIELDS.items()}
    train = [*knobs.flags(TrainConfig), *knobs.flags(resample.ResampleConfig, by_field.__getitem__)]
    return train, list(knobs.flags(run.RunOptions))


def flag(field: str) -> str:
    """The command-line flag of an option, as library errors name it."""
    if field in FLAGS:
        return FLAGS[field]
    train, opts = _knob_flags()
    return next((f.flag for f in train + opts if f.name == field), "--" + field.replace("_", "-"))


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
    """A comma-separated list of registered architecture names."""
    from sae_jax import architectures

    vals = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [v for v in vals if v not in architectures.names()]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(architectures.names())}, "
                                         f"got {text!r}")
    return vals


def arch_option(text: str) -> tuple[str, str, object]:
    """NAME.KEY=VALUE: a registered architecture's declared option (its record parses VALUE)."""
    from sae_jax import architectures

    head, eq, value = text.partition("=")
    name, dot, key = head.strip().partition(".")
    if not (eq and dot and key):
        raise argparse.ArgumentTypeError(f"expected ARCH.OPTION=VALUE, got {text!r}")
    try:
        return name, key.strip(), architectures.get(name).parse_option(key.strip(), value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).replace("`arch_options`: ", "").replace("`arch`", "--arch")) from None


def option_flag(arch: str, key: str) -> str:
    """The flag of a record's declared option: --ARCH-KEY (e.g. --matryoshka-widths)."""
    return f"--{arch}-{key}".replace("_", "-")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every grid-training command (toy, grid and synth)."""
    g = p.add_argument_group("grid")
    g.add_argument("--l1", type=floats, help="comma list of L1 coefficients alpha")
    g.add_argument("--ratios", type=floats, help="comma list of dictionary size / features")
    g.add_argument("--seeds", type=int, help="SAE initialisations per cell (default 1)")
    from sae_jax import architectures, knobs, recipes

    known = architectures.names()
    which = lambda has: ", ".join(r.name for r in architectures.REGISTRY if has(r))
    g.add_argument("--arch", type=names, default=None,
                   help=f"comma list of architectures: {known[0]} (default, the report's), {', '.join(known[1:])}")
    g.add_argument("--k", type=ints, help=f"comma list of k (active latents) for {which(lambda r: r.uses_k)}")
    g.add_argument("--l0", type=floats, help=f"comma list of L0 coefficients lambda for "
                                             f"{which(lambda r: r.coeff == 'l0')}")
    optional = [f"{r.name}.{k}" for r in architectures.REGISTRY for k, _ in r.options]
    g.add_argument("--arch-option", type=arch_option, action="append", default=None,
                   help="ARCH.OPTION=VALUE (repeatable): an architecture's static option"
                        + (f" ({', '.join(optional)})" if optional else " (none registered declares any)"))
    for r in architectures.REGISTRY:  # each declared option also as --ARCH-OPTION VALUE
        helps = dict(r.option_help)
        for key, _ in r.options:
            g.add_argument(option_flag(r.name, key), dest=f"arch_option__{r.name}__{key}", default=None,
                           metavar=key.upper(),
                           type=lambda text, r=r, key=key: arch_option(f"{r.name}.{key}={text}"),
                           help=helps.get(key, f"{r.name}'s option {key}") + f" (= --arch-option {r.name}.{key}=...)")

    train, opts = _knob_flags()
    groups = {knobs.TRAINING: p.add_argument_group(knobs.TRAINING)}
    for f in opts:
        if f.meta["group"] == knobs.TRAINING:  # --steps, --seed
            knobs.add(p, groups, f)
    groups[knobs.TRAINING].add_argument(
        "--recipe", choices=tuple(recipes.RECIPES), default=None,
        help="report: Adam 1e-3, no resampling (default; synth's: synth); fast: tied init, resampling, "
             "cosine decay; synth: SynthSAEBench's Adam 3e-4, batch 1024, a decoder bias")
    for f in train:
        knobs.add(p, groups, f)
    for f in opts:
        if f.meta["group"] != knobs.TRAINING:
            knobs.add(p, groups, f)
    groups[knobs.RUN].add_argument("--distributed", action="store_true",
                                   help="one process of several: jax.distributed.initialize() (docs/devices.md)")


def _train_overrides(args: argparse.Namespace) -> dict:
    from sae_jax import knobs

    return knobs.values(args, _knob_flags()[0])


def _run_options(args: argparse.Namespace, default_out: str, steps: int, overrides: dict):
    from sae_jax import knobs, recipes, run

    given = knobs.values(args, _knob_flags()[1])
    return run.RunOptions(**{**given, "out": args.out or default_out, "steps": steps,
                             "derived_from_steps": recipes.derived_from_steps(args.recipe, overrides)})


def cmd_toy(args: argparse.Namespace) -> int:
    from sae_jax import grid, recipes, run, toy

    preset = recipes.PRESETS[args.preset]
    def pick(name, field=None):
        return getattr(preset, field or name) if getattr(args, name) is None else getattr(args, name)
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
    if args.l1 is None and _reads_l1(axes["archs"]):
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
    for field, value in recipes.STORED_ACTIVATIONS.items():  # a resumed run keeps its checkpoint's
        if overrides.get(field) is None:
            overrides[field] = (run.checkpointed_train_value(args.out or "runs/grid", field) if args.resume
                                else None) or value
    train = recipes.train_config(args.recipe, steps, overrides)
    opts = _run_options(args, "runs/grid", steps, overrides)
    _summary(run.run(spec, train, opts, data, compare_toy=args.compare_toy), opts.out, opts.figures)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from sae_jax import grid, recipes, run_synth

    data = run_synth.SynthData.open(args.model, args.preset, args.world_seed)
    steps = 5000 if args.steps is None else args.steps
    axes = _arch_axes(args)
    if args.l1 is None and _reads_l1(axes["archs"]):
        raise UsageError(f"--l1 is required for {', '.join(_reads_l1(axes['archs']))} cells "
                         "(a comma list of L1 coefficients)")
    spec = grid.GridSpec.from_ratios(args.l1 or (), args.ratios or (0.25,), data.world.f, args.seeds or 1, **axes)
    args.recipe = args.recipe or "synth"
    overrides = _train_overrides(args)
    train = recipes.train_config(args.recipe, steps, overrides)
    opts = _run_options(args, "runs/synth", steps, overrides)
    _summary(run_synth.run(spec, train, opts, data), opts.out, opts.figures)
    return 0


def _arch_axes(args: argparse.Namespace) -> dict:
    """GridSpec's architecture fields from --arch, --k, --l0 and --arch-option."""
    from sae_jax import architectures

    flagged = [v for name, v in vars(args).items() if name.startswith("arch_option__") and v is not None]
    return {"archs": args.arch or (architectures.DEFAULT,), "k": args.k or (), "l0_coeff": args.l0 or (),
            "arch_options": tuple(args.arch_option or ()) + tuple(flagged)}


def _reads_l1(names: tuple[str, ...]) -> list[str]:
    """The architectures among `names` whose cells read alpha (--l1)."""
    from sae_jax import architectures

    return [n for n in names if architectures.get(n).coeff == "l1"]


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
        record = archs.get(s.get("arch") or archs.DEFAULT)
        key, name = record.sparsity_key, record.sparsity_name
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
    w.add_argument("--preset", choices=("small", "paper"), default="small",
                   help="the world, grid and steps: small (CPU, d 64, default) or paper (the report's sizes)")
    w.add_argument("--d", type=int, help="input dimension (default: the preset's)")
    w.add_argument("--features", type=int, help="number of ground-truth features h")
    w.add_argument("--mean-active", type=float, help="mean number of active features per sample")
    w.add_argument("--decay", type=float, help="feature i fires with probability proportional to decay^i")
    w.add_argument("--no-correlation", action="store_true", help="features fire independently")
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
                   "corr_strength (every value in the same compiled step; docs/reproduction.md)")
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

    p = sub.add_parser("synth", help="train an SAE grid on a SynthSAEBench world, scored with its metrics")
    w = p.add_argument_group("SynthSAEBench world (exactly one of --model, --preset)")
    w.add_argument("--model", help="a directory saved by SAELens's SyntheticModel.save")
    w.add_argument("--preset", help="synth-16k (16,384 features in 768 dimensions) or synth-small (4,096 in 256)")
    w.add_argument("--world-seed", type=int, help="the preset's seed (default 42)")
    add_training_args(p)
    p.set_defaults(func=cmd_synth, eval_samples=100_000)

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
