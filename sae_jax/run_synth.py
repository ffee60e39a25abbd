"""One run of a grid on a SynthSAEBench world (`sae-jax synth`): the world is sampled inside the
compiled scan like a toy world (`grid.run_toy_chunk`), and every cell is scored with
SynthSAEBench's metrics (`synth_eval`, SAELens's definitions) beside the usual ones.

`run(spec, train, opts, data)` trains (or resumes) with `run.train_grid`, evaluates with
`run.evaluate` (MMCS and the rest against the world's feature vectors, on the first
`USUAL_EVAL_SAMPLES` evaluation samples), then streams all `opts.eval_samples` evaluation samples,
with their ground-truth feature activations, once through every cell's inference-time encoder
(`archs.encode`, what `export.load_cell` computes) for `synth_eval.evaluate_many`: each batch is
drawn once and encoded by every cell. Those metrics go
into each cell of results.json: `mcc` (SAELens's: |cos|, Hungarian, mean over the matched
pairs), `uniqueness`, `precision`, `recall`, `f1`, `accuracy`, `explained_variance`, `l0`,
`true_l0`, `shrinkage` and `dead_latents` (never fired on the evaluation samples; `dead` keeps
its training-window meaning).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from sae_jax import archs, export, grid, report, results, sae, sharding, synth, synth_eval
from sae_jax import run as run_
from sae_jax.errors import UsageError

EVAL_KEY = 0x5E7A1  # folded into the seed's key: the evaluation samples, a key no training step uses
EVAL_BATCH = 1024  # evaluation samples per streamed batch (SynthSAEBench's training batch)
USUAL_EVAL_SAMPLES = 16384  # the evaluation samples of the usual per-cell metrics (results.evaluate)
TABLE = [("index", "cell", ""), ("arch", "arch", ""), ("setting", "setting", ""), ("ratio", "ratio", ".3g"),
         ("dict_size", "width", ""),
         ("l0", "L0", ".2f"), ("f1", "F1", ".3f"), ("mcc", "MCC", ".3f"), ("uniqueness", "uniqueness", ".3f"),
         ("explained_variance", "expl. var.", ".3f"), ("dead_latents", "dead latents", "")]


@dataclasses.dataclass(frozen=True)
class SynthData:
    """A SynthSAEBench world and where it came from (`source`: {"model": DIR} or {"preset":
    NAME, "world_seed": S}, recorded in results.json and compared on resume)."""

    world: synth.SynthWorld
    source: dict

    @classmethod
    def open(cls, model: str | None = None, preset: str | None = None,
             world_seed: int | None = None) -> "SynthData":
        """The world of a SAELens model directory (`synth.load_saelens`) or of a preset (drawn
        with `world_seed`, default 42); exactly one of the two."""
        if (model is None) == (preset is None):
            raise UsageError("give exactly one of --model (a SAELens synthetic model directory) or --preset")
        if preset is not None:
            world_seed = 42 if world_seed is None else world_seed
            try:
                return cls(synth.preset(preset, seed=world_seed), {"preset": preset, "world_seed": world_seed})
            except ValueError as e:
                raise UsageError(f"--preset: {e}") from None
        if world_seed is not None:
            raise UsageError("--world-seed draws a preset; a saved model (--model) has its own")
        path = Path(model).expanduser().absolute()
        if not path.is_dir():
            raise UsageError(f"--model {model}: no such directory")
        try:
            world = synth.load_saelens(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"--model {model} is not a model saved by SAELens's SyntheticModel.save "
                             f"({why})") from None
        return cls(world, {"model": str(path)})


_sample = jax.jit(synth.sample, static_argnums=2)


def eval_batches(world: synth.SynthWorld, seed: int, n: int,
                 batch: int = EVAL_BATCH) -> Iterator[tuple[jax.Array, jax.Array]]:
    """The n evaluation samples as (x (B, d), feature activations (B, F)) batches, batch i drawn
    from fold_in(fold_in(PRNGKey(seed), EVAL_KEY), i): the same samples on every call."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_KEY)
    for i, start in enumerate(range(0, n, batch)):
        yield _sample(jax.random.fold_in(key, i), world, min(batch, n - start))


_encode = jax.jit(archs.encode, static_argnums=2)
_decode = jax.jit(sae.decode)


def cell_metrics(state: grid.GridState, spec: grid.GridSpec, world: synth.SynthWorld, seed: int,
                 n: int) -> list[dict]:
    """`synth_eval.evaluate` of every cell (in cell order) on the n evaluation samples, with the
    cell's inference-time encode (`archs.encode`) and decode (c D_unit + b_dec); one pass over
    the samples (`synth_eval.evaluate_many`: each batch drawn once, encoded by every cell)."""
    state = grid.unpad(sharding.to_host(state), spec)
    dicts = results.dictionaries(state, spec)
    models = []
    for c in spec.cells():
        params, arch = jax.tree.map(jax.numpy.asarray, grid.cell_params(state, c)), c.arch_spec
        models.append((lambda x, p=params, a=arch: _encode(p, x, a), functools.partial(_decode, params),
                       dicts[c.index]))
    return synth_eval.evaluate_many(models, world.features_FxD, eval_batches(world, seed, n))


def run(spec: grid.GridSpec, train: grid.TrainConfig, opts: run_.RunOptions, data: SynthData) -> dict:
    """Trains, evaluates and writes results.json, dictionaries.npz (with the world's feature
    vectors as `ground_truth`), weights.safetensors, figures and REPORT.md; returns the results."""
    opts.validate()
    world = data.world
    config = {"kind": "synth", **data.source, "features": world.f, "d": world.d, "grid": spec.to_dict(),
              "train": train.to_dict(), "steps": opts.steps, "seed": opts.seed, "eval_samples": opts.eval_samples}
    truth = world.features_FxD
    state, trained = run_.train_grid(spec, train, opts, world.d, config, world=world, ground_truth=truth)
    usual = min(opts.eval_samples, USUAL_EVAL_SAMPLES)
    x_eval = np.concatenate([np.asarray(x) for x, _ in itertools.islice(
        eval_batches(world, opts.seed, usual), -(-usual // EVAL_BATCH))])
    cells, dicts, analysis = run_.evaluate(state, spec, train, x_eval, truth, trained)
    for c, m in zip(cells, cell_metrics(state, spec, world, opts.seed, opts.eval_samples)):
        c.update(m)
    out = results.write(opts.out, config, cells, analysis, dicts, np.asarray(truth),
                        {"train_seconds": trained.seconds})
    export.write_weights(opts.out, sharding.gather_to_host(state), spec, x_eval)
    if jax.process_index() == 0:
        figs = {}
        if opts.figures:
            from sae_jax import plots  # matplotlib: only when figures are drawn

            figs = plots.toy_figures(out, os.path.join(opts.out, "figures"))
        path = report.write(opts.out, out, figs, "sae-jax synth: a grid on a SynthSAEBench world")
        with open(path, "a") as f:
            f.write("\n" + "\n".join(synth_table(out)) + "\n")
    return out


def synth_table(res: dict) -> list[str]:
    """REPORT.md's SynthSAEBench section: every cell's metrics (from results.json)."""
    n = res["config"]["eval_samples"]
    setting = lambda c, r: f"{r.sparsity_name} {c[r.sparsity_key]:g}"
    rows = [{**c, "setting": setting(c, archs.get(c["arch"]))} for c in res["cells"]]
    return ["## SynthSAEBench metrics", "",
            f"SAELens's definitions (`sae_jax.synth_eval`) on {n:,} evaluation samples, with each cell's "
            "inference-time encoder; dead latents never fired on them.", "",
            *report.table(rows, TABLE)]
