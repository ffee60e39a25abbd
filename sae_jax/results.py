"""From a trained grid state to the results file: per-cell metrics, grid diagnostics, selection.

`results.json` = {"config": {...}, "cells": [per-cell dicts in GridSpec.cells() order],
"suggested": {...}, "ground_truth_optimum": {...} or null}. `dictionaries.npz` holds
`decoder_{i}` (m x d, unit rows) for cell i and, for toy runs, `ground_truth` (h x d).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import archs, grid, matching, metrics, sae, selection

Array = jax.Array


@jax.jit
def _group_max_cos(params: sae.SAEParams, reference_NxD: Array) -> Array:
    """(C,) MMCS of every dictionary of a size group against the reference."""
    return jax.vmap(lambda p: jnp.mean(metrics.max_cosine(sae.dictionary(p), reference_NxD)))(params)


def grid_mmcs(state: grid.GridState, reference_NxD: Array) -> np.ndarray:
    """MMCS against the reference for every cell, in cell order (padding dropped)."""
    from sae_jax import sharding

    out = []
    for g in state.groups:  # (on several processes, an all-gather per group)
        vals, valid = sharding.to_host((_group_max_cos(g.params, reference_NxD), g.valid))
        out.append(np.asarray(vals)[np.asarray(valid)])
    return np.concatenate(out)


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate(state: grid.GridState, spec: grid.GridSpec, cfg: grid.TrainConfig, x_eval: Array,
             ground_truth: Array | None = None) -> list[dict]:
    """Per-cell metrics on an evaluation batch (clean inputs and targets), computed on this
    process's first device: a sharded state is gathered to the host and its padding dropped, so
    that the evaluation compiles for one device whatever the run's (every process must call it)."""
    from sae_jax import sharding

    state = grid.unpad(sharding.to_host(state), spec)
    cells = spec.cells()
    stats = [jax.device_get(metrics.group_stats(g.params, x_eval, x_eval, cfg.l1_convention, g.arch))
             for g in state.groups]
    host = [jax.device_get({"diverged": g.diverged, "n_resampled": g.n_resampled,
                            "dead": metrics.dead_latents(g.since_fired, cfg.dead_window)})
            for g in state.groups]  # one transfer per group, not per cell
    mm = grid_mmcs(state, ground_truth) if ground_truth is not None else None
    matched = None
    if ground_truth is not None:  # one-to-one matching: MCC, recovered share, redundant latents
        skip = {c.index for c in cells if bool(host[c.group]["diverged"][c.slot])}
        matched = matching.per_cell(dictionaries(state, spec), np.asarray(ground_truth), skip)
    out = []
    for c in cells:
        g = host[c.group]
        s = {k: v[c.slot] for k, v in stats[c.group].items()}
        diverged = bool(g["diverged"][c.slot])
        out.append({
            "index": c.index, "l1": c.l1_coeff, "ratio": c.ratio, "dict_size": c.dict_size,
            "seed": c.seed, "noise": c.noise, "arch": c.arch, "k": c.k or None,
            "l0_coeff": c.l0_coeff if archs.get(c.arch).coeff == "l0" else None,
            "mmcs": None if mm is None or diverged else _f(mm[c.index]),
            "dead": int(g["dead"][c.slot]),
            "recon_loss": _f(s["recon_loss"]), "l1_loss": _f(s["l1_loss"]),
            "l0": _f(s["l0"]), "fvu": _f(s["fvu"]),
            "diverged": diverged, "n_resampled": int(g["n_resampled"][c.slot]),
            **(matched[c.index] if matched else {}),
            **({"world_value": c.world_value} if c.world_value is not None else {}),
        })
    from sae_jax import quality
    quality.annotate(out, state, spec, x_eval)  # explained variance, L2 ratio, bias, alive, density
    return out


_group_dictionaries = jax.jit(jax.vmap(sae.dictionary))


def dictionaries(state: grid.GridState, spec: grid.GridSpec) -> list[np.ndarray]:
    """Every cell's dictionary (unit-norm atoms as rows), in cell order: one call per group."""
    per_group = [np.asarray(_group_dictionaries(g.params)) for g in state.groups]
    return [per_group[c.group][c.slot] for c in spec.cells()]


def analyse(cells: list[dict], dicts: list[np.ndarray], l1_convention: str = "report") -> dict:
    """Adds mmcs_with_larger and SSLL to each non-diverged cell; returns the selection result
    and the ground-truth optimum. Diverged cells are skipped and listed.

    Each architecture is analysed on its own (sparsity x ratio) plane: alpha for relu_l1, k for
    topk/batchtopk (ordered from dense to sparse, i.e. k descending), lambda for jumprelu. The
    top-level `suggested` and `ground_truth_optimum` are the first architecture's; with several,
    `by_arch` holds each one's."""
    for c in cells:
        c.update(mmcs_with_larger=None, std_log_recon=None, std_log_l1=None, ssll=None)
    names = list(dict.fromkeys(c.get("arch", archs.DEFAULT) for c in cells))
    by_arch = {a: _analyse_arch([c for c in cells if c.get("arch", archs.DEFAULT) == a], dicts, a,
                                l1_convention) for a in names}
    first = by_arch[names[0]]
    out = {"suggested": first["suggested"], "ground_truth_optimum": first["ground_truth_optimum"],
           "diverged_cells": [c["index"] for c in cells if c["diverged"]]}
    if len(names) > 1:
        out["by_arch"] = by_arch
    return out


def _analyse_arch(cells: list[dict], dicts: list[np.ndarray], arch: str, l1_convention: str) -> dict:
    record = archs.get(arch)
    key = record.sparsity_key
    live = [c for c in cells if not c["diverged"]]
    by_key = {(c[key], c["dict_size"], c["seed"]): dicts[c["index"]] for c in live if c["noise"] == 0}
    larger = metrics.mmcs_with_larger(by_key)
    z_recon = metrics.standardized_log([c["recon_loss"] if c["recon_loss"] is not None else np.nan for c in live])
    z_l1 = metrics.standardized_log([c["l1_loss"] if c["l1_loss"] is not None else np.nan for c in live])
    for c, zr, zl in zip(live, z_recon, z_l1):
        c["mmcs_with_larger"] = _f(larger.get((c[key], c["dict_size"], c["seed"]), np.nan))
        c["std_log_recon"], c["std_log_l1"], c["ssll"] = _f(zr), _f(zl), _f(zr + zl)
    # the sparsity axis runs from the densest to the sparsest setting (a larger k is denser)
    s_axis = sorted({c[key] for c in cells}, reverse=record.uses_k)
    ratio_axis = sorted({c["ratio"] for c in cells})
    plane = lambda name: metrics.plane([np.nan if c.get(name) is None else c[name] for c in live],
                                       [c[key] for c in live], [c["ratio"] for c in live],
                                       s_axis, ratio_axis)
    # the carried ridge keeps the penalty per latent: alpha / m or lambda / m under the report's
    # convention; k is a count per sample, so it carries unchanged
    exponent = 1.0 if l1_convention == "report" and record.penalty_per_latent else 0.0
    # a fixed-L0 architecture takes its ratio from the live latents (selection.by_live_latents)
    alive = plane("frac_alive") if record.uses_k else None
    suggested = selection.suggest(plane("dead"), plane("ssll"), plane("mmcs_with_larger"),
                                  s_axis, ratio_axis, size_exponent=exponent, alive_AxR=alive)
    if key != "l1":  # name the sparsity setting for what it is
        for d in [suggested] + suggested["methods"]:
            v = d.pop("l1")
            d[key] = None if v is None else (int(v) if record.uses_k else v)
            if "why" in d:
                d["why"] = d["why"].replace("alpha", record.sparsity_name)
        suggested["summary"] = suggested["summary"].replace("alpha", record.sparsity_name)
    if suggested["ratio"] is not None:
        match = [c for c in live if c["ratio"] == suggested["ratio"] and c[key] == suggested[key]]
        suggested["cell"] = match[0]["index"] if match else None
        suggested["mmcs"] = match[0]["mmcs"] if match else None
    suggested["arch"] = arch
    optimum = None
    scored = [c for c in live if c["mmcs"] is not None]
    if scored:
        best = max(scored, key=lambda c: c["mmcs"])
        optimum = {"cell": best["index"], "ratio": best["ratio"], key: best[key], "mmcs": best["mmcs"],
                   "arch": arch}
    return {"suggested": suggested, "ground_truth_optimum": optimum}


def write(out_dir: str, config: dict, cells: list[dict], analysis: dict, dicts: list[np.ndarray],
          ground_truth: np.ndarray | None = None, extra: dict | None = None) -> dict:
    """Writes results.json and dictionaries.npz atomically (temp file, then rename). On several
    hosts only process 0 writes."""
    results = {"config": config, "cells": cells, **analysis, **(extra or {})}
    if jax.process_index() != 0:
        return results
    os.makedirs(out_dir, exist_ok=True)
    _atomic_json(os.path.join(out_dir, "results.json"), results)
    arrays = {f"decoder_{i}": d for i, d in enumerate(dicts)}
    if ground_truth is not None:
        arrays["ground_truth"] = np.asarray(ground_truth)
    tmp = os.path.join(out_dir, "dictionaries.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out_dir, "dictionaries.npz"))
    return results


def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load(out_dir: str) -> dict:
    """Loads DIR/results.json."""
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)
