"""The SynthSAEBench race (issue 27): `sae-jax synth` against SAELens's `SyntheticSAERunner` on
the same CPU, the same SAELens-saved model and the same budget, side by side in one run.

    /work/venv-sl/bin/python benchmarks/synth_race.py [--quick] [--grid-arch batchtopk,topk,matryoshka]

Needs SAELens (`pip install -e '.[bench]'`: sae-lens>=6.54, torch). Every leg is a subprocess
timed end to end (interpreter start, imports, model load, training, final evaluation, writing
its outputs), in this order:

1. the race model: SAELens's `SyntheticModel` from a SynthSAEBench-16k-style configuration at
   1,536 features in 128 dimensions (Zipf 0.5 from p 0.4 to 5e-4; 12 roots x branching 4 x
   depth 3, all children mutually exclusive and scaled by their parent; rank-25 copula at scale
   0.1; magnitudes 5 -> 4 with folded-normal stds; bias 0.5; 100 orthogonalising steps; seed
   42), saved with its `save` under --work; then each sampler's milliseconds per batch of
   1,024, each in its own process (SAELens's `sample_with_features`, ours `synth.sample` jitted);
2. SAELens: `SyntheticSAERunner` with one BatchTopK SAE (k 8, width 384), 4,096,000 samples in
   batches of 1,024, lr 3e-4, its other defaults (Adam 0.9/0.999, constant lr, no checkpoints,
   no wandb), its final evaluation on --eval-samples samples; it saves its inference SAE;
3. sae_jax: `sae-jax synth --model DIR --arch batchtopk --k 8 --ratios 0.25 --steps 4000
   --batch-size 1024` (recipe synth: Adam 3e-4, decoder bias at the data mean, AuxK; its
   evaluation on the same number of samples, its figures and REPORT.md; no checkpoints, like
   the runner), twice with a fresh compilation cache: the first run compiles, the second finds
   the cache as any repeated run does;
4. the grid: --grid-arch x k 6, 8, 12 at ratio 0.25, twice the same way;
4b. SAELens's leg again (--saelens-runs, default 2 in all): this machine's speed drifts by more
   than the margins measured, so SAELens runs before and after sae-jax's legs and every ratio is
   against its fastest run;
5. scoring as users load them: SAELens's saved inference SAE and our cell exported with
   `sae-jax export --format saelens`, both loaded with `SAE.load_from_disk` and scored by
   SAELens's `eval_sae_on_synthetic_data` on the same samples (torch seed --score-seed).

It prints the CPU (`lscpu`) and the load average before and after, the legs' seconds and
their ratios, F1 and MCC side by side, and each acceptance line's pass or fail; race.json in
--work keeps the numbers. --quick: 102,400 samples (100 steps), 10,240 evaluation samples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES, D, WIDTH, K, BATCH, LR = 1536, 128, 384, 8, 1024, 3e-4
MODEL_CONFIG = """
from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig,
    LowRankCorrelationConfig, OrthogonalizationConfig, SyntheticModelConfig, ZipfianFiringProbabilityConfig)
CONFIG = SyntheticModelConfig(
    num_features=1536, hidden_dim=128,
    firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
    hierarchy=HierarchyConfig(total_root_nodes=12, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                              mutually_exclusive_min_depth=0, compensate_probabilities=True,
                              scale_children_by_parent=True),
    orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
    correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
    mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
    std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
    bias=0.5, seed=42)
"""
SAELENS_RUNNER = """
import sys, torch
from sae_lens import BatchTopKTrainingSAEConfig
from sae_lens.config import LoggingConfig
from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig
model, out, samples, eval_samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
cfg = SyntheticSAERunnerConfig(
    synthetic_model=model, sae=BatchTopKTrainingSAEConfig(d_in={d}, d_sae={width}, k={k}),
    training_samples=samples, batch_size={batch}, lr={lr}, output_path=out, eval_samples=eval_samples,
    logger=LoggingConfig(log_to_wandb=False))
SyntheticSAERunner(cfg).run()
""".format(d=D, width=WIDTH, k=K, batch=BATCH, lr=LR)


def cpu() -> str:
    """lscpu's model name and core count, and the flags that matter."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    f = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = f.get("Flags", "").split()
    has = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    return f"{f.get('Model name', '?').strip()}, {f.get('CPU(s)', '?').strip()} CPUs; {', '.join(has)}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(name: str, cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Seconds the command takes, start to exit; its output goes to log."""
    print(f"  {name}: {' '.join(cmd[1:])[:150]}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent).returncode
    s = time.perf_counter() - t
    if code:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    print(f"    {s:.1f} s", flush=True)
    return s


def build_model(work: Path) -> Path:
    """The race model, built and saved by SAELens (in a subprocess: its orthogonalisation)."""
    path = work / "model"
    script = MODEL_CONFIG + ("\nfrom sae_lens.synthetic import SyntheticModel\n"
                             f"SyntheticModel(CONFIG).save({str(path)!r})\n")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return path


SAMPLER = """
import sys, time, numpy as np
model, which, reps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if which == "saelens":
    import torch
    from sae_lens.synthetic import SyntheticModel
    m = SyntheticModel.load_from_disk(model)
    torch.manual_seed(0)
    draw = lambda i: m.sample_with_features(batch)
else:
    import jax
    from sae_jax import synth
    world, f, key = synth.load_saelens(model), jax.jit(synth.sample, static_argnums=2), jax.random.PRNGKey(0)
    draw = lambda i: jax.block_until_ready(f(jax.random.fold_in(key, i), world, batch))
for i in range(3):
    draw(i)
ts = []
for i in range(reps):
    t = time.perf_counter()
    draw(10 + i)
    ts.append(time.perf_counter() - t)
print(1e3 * float(np.median(ts)))
"""


def samplers(model: Path, reps: int, env: dict) -> dict:
    """Milliseconds per batch of 1,024 (median of reps, after warm-up), each sampler in its own
    process (torch's and XLA's thread pools would otherwise compete): SAELens's
    `sample_with_features`, ours `synth.sample` jitted."""
    out = {}
    for which in ("saelens", "sae_jax"):
        r = subprocess.run([sys.executable, "-c", SAMPLER, str(model), which, str(reps), str(BATCH)],
                           capture_output=True, text=True, env=env, check=True)
        out[f"{which}_ms"] = float(r.stdout.strip().splitlines()[-1])
    return out


def score(model: Path, sae_dirs: dict[str, Path], n: int, seed: int) -> dict:
    """SAELens's `eval_sae_on_synthetic_data` of each saved SAE, on the same seeded samples."""
    import torch
    from sae_lens import SAE
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data

    sm = SyntheticModel.load_from_disk(str(model))
    out = {}
    for name, path in sae_dirs.items():
        sae = SAE.load_from_disk(str(path))
        torch.manual_seed(seed)
        r = eval_sae_on_synthetic_data(sae, sm.feature_dict, sm.activation_generator, num_samples=n,
                                       batch_size=BATCH)
        out[name] = {"f1": float(r.classification.f1_score), "mcc": float(r.mcc), "l0": float(r.sae_l0),
                     "explained_variance": float(r.explained_variance), "architecture": sae.cfg.architecture()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: 100 steps, 10,240 evaluation samples")
    p.add_argument("--samples", type=int, default=None, help="training samples (default 4,096,000)")
    p.add_argument("--eval-samples", type=int, default=None, help="each runner's own final evaluation")
    p.add_argument("--score-samples", type=int, default=None, help="the common scoring (default 100,000)")
    p.add_argument("--score-seed", type=int, default=1234)
    p.add_argument("--grid-arch", default="batchtopk,topk,matryoshka")
    p.add_argument("--grid-k", default="6,8,12")
    p.add_argument("--runs", type=int, default=2, help="sae-jax runs of each leg (the last finds the cache)")
    p.add_argument("--saelens-runs", type=int, default=2,
                   help="SAELens runs: the first before sae-jax's legs, the rest after them; each "
                        "ratio is against the fastest (this machine's speed drifts between legs)")
    p.add_argument("--work", default=None, help="where the model, runs and logs go (default: a temp dir)")
    p.add_argument("--sampler-reps", type=int, default=30)
    args = p.parse_args()
    samples = args.samples or (102_400 if args.quick else 4_096_000)
    eval_n = args.eval_samples or (10_240 if args.quick else 100_000)
    score_n = args.score_samples or (10_240 if args.quick else 100_000)
    steps = samples // BATCH
    work = Path(args.work or tempfile.mkdtemp(prefix="synth-race-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "jax-cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "SAE_JAX_CACHE_DIR": str(cache)}
    sys.path.insert(0, str(ROOT))
    print(f"CPU: {cpu()}\nload average at the start: {load()}\nwork: {work}")
    print(f"budget: {samples:,} samples in batches of {BATCH} ({steps} steps), lr {LR:g}; each runner's "
          f"evaluation {eval_n:,} samples; scoring {score_n:,} samples", flush=True)

    model = build_model(work)
    res: dict = {"cpu": cpu(), "samples": samples, "eval_samples": eval_n, "score_samples": score_n}
    res["sampler"] = samplers(model, args.sampler_reps, env)
    s = res["sampler"]
    print(f"sampler, ms per batch of {BATCH}: SAELens {s['saelens_ms']:.1f}, sae_jax {s['sae_jax_ms']:.1f} "
          f"({s['saelens_ms'] / s['sae_jax_ms']:.2f}x)", flush=True)

    runner = work / "saelens_runner.py"
    runner.write_text(textwrap.dedent(SAELENS_RUNNER))
    sl_out = work / "saelens"
    saelens = lambda i, out: timed(f"SAELens SyntheticSAERunner, one BatchTopK SAE, run {i + 1}",  # noqa: E731
                                   [sys.executable, str(runner), str(model), str(out), str(samples), str(eval_n)],
                                   work / f"{out.name}.log")
    sl_runs = [saelens(0, sl_out)]
    jax_cmd = [sys.executable, "-m", "sae_jax.cli", "synth", "--model", str(model), "--ratios", "0.25",
               "--steps", str(steps), "--batch-size", str(BATCH), "--eval-samples", str(eval_n),
               "--checkpoint-every", "0", "--no-progress"]
    one = [timed(f"sae-jax synth, one cell, run {i + 1}",
                 jax_cmd + ["--arch", "batchtopk", "--k", str(K), "--out", str(work / f"one{i + 1}")],
                 work / f"one{i + 1}.log", env) for i in range(args.runs)]
    grid = [timed(f"sae-jax synth, grid {args.grid_arch} x k {args.grid_k}, run {i + 1}",
                  jax_cmd + ["--arch", args.grid_arch, "--k", args.grid_k, "--out", str(work / f"grid{i + 1}")],
                  work / f"grid{i + 1}.log", env) for i in range(args.runs)]
    sl_runs += [saelens(i, work / f"saelens{i + 1}") for i in range(1, args.saelens_runs)]
    res.update(saelens_runs_s=sl_runs, saelens_s=min(sl_runs), one_cell_s=one, grid_s=grid,
               grid_arch=args.grid_arch, grid_k=args.grid_k)
    export = work / "sae_jax_export"
    subprocess.run([sys.executable, "-m", "sae_jax.cli", "export", str(work / f"one{args.runs}"), "--cell", "0",
                    "--format", "saelens", "--out", str(export)], check=True, env=env, stdout=subprocess.DEVNULL)
    res["scores"] = score(model, {"SAELens": sl_out, "sae_jax": export}, score_n, args.score_seed)
    res["load_end"] = load()

    sl_s, one_s, grid_s = res["saelens_s"], one[-1], grid[-1]
    print(f"\nload average at the end: {res['load_end']}")
    print(f"{'leg':<44}{'seconds':>9}{'SAELens / leg':>15}")
    for i, t in enumerate(sl_runs):
        print(f"{f'SAELens, one BatchTopK SAE, run {i + 1}':<44}{t:>9.1f}{sl_s / t:>15.2f}")
    for i, t in enumerate(one):
        print(f"{f'sae-jax, one cell, run {i + 1}':<44}{t:>9.1f}{sl_s / t:>15.2f}")
    for i, t in enumerate(grid):
        cells = len(args.grid_arch.split(",")) * len(args.grid_k.split(","))
        print(f"{f'sae-jax, {cells}-cell grid, run {i + 1}':<44}{t:>9.1f}{sl_s / t:>15.2f}")
    sc = res["scores"]
    print(f"\n{'scored by SAELens':<20}{'F1':>8}{'MCC':>8}{'L0':>8}{'expl. var.':>12}  saved as")
    for name, m in sc.items():
        print(f"{name:<20}{m['f1']:>8.4f}{m['mcc']:>8.4f}{m['l0']:>8.2f}{m['explained_variance']:>12.4f}  "
              f"{m['architecture']}")
    checks = {
        f"one cell at least 2x faster (run {args.runs}: {sl_s / one_s:.2f}x)": sl_s / one_s >= 2,
        f"grid finishes before SAELens's one cell ({grid_s:.1f} s < {sl_s:.1f} s)": grid_s < sl_s,
        "F1 no lower than SAELens's - 0.01": sc["sae_jax"]["f1"] >= sc["SAELens"]["f1"] - 0.01,
        "MCC no lower than SAELens's - 0.01": sc["sae_jax"]["mcc"] >= sc["SAELens"]["mcc"] - 0.01,
    }
    res["checks"] = checks
    print()
    for line, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {line}")
    (work / "race.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{work / 'race.json'}")


if __name__ == "__main__":
    main()
