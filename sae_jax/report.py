"""DIR/REPORT.md: the figures inline, the grid as a table, the suggestion beside the optimum,
and a plain reading of what the figures show."""

from __future__ import annotations

import os

import numpy as np


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    return format(v, spec) if isinstance(v, float) else str(v)


def table(cells: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    """A markdown table of the cells, one column per (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for c in cells:
        lines.append("| " + " | ".join(_fmt(c.get(k), f) for k, _, f in cols) + " |")
    return lines


CELL_COLUMNS = [("index", "cell", ""), ("l1", "alpha", ".3g"), ("ratio", "ratio", "g"),
                ("dict_size", "m", ""), ("seed", "seed", ""), ("mmcs", "MMCS", ".3f"),
                ("mcc", "MCC", ".3f"), ("recovered", "recovered", ".2f"), ("redundant", "redundant", ""),
                ("dead", "dead", ""), ("recon_loss", "recon", ".2e"), ("l1_loss", "L1", ".2e"),
                ("l0", "L0", ".1f"), ("fvu", "FVU", ".3f"), ("explained_variance", "expl. var.", ".3f"),
                ("l2_ratio", "L2 ratio", ".3f"), ("rel_recon_bias", "rel. bias", ".3f"),
                ("frac_alive", "alive", ".2f"), ("ssll", "SSLL", ".2f"),
                ("mmcs_with_larger", "MMCS w/ larger", ".3f"), ("n_resampled", "resampled", ""),
                ("diverged", "diverged", "")]


def reading(results: dict, key: str = "l1", name: str = "alpha") -> list[str]:
    """Plain statements read off the results (each one checked, none hard-coded); `key` and
    `name`: the sparsity setting (alpha, k, lambda) of the architecture the cells have."""
    cells = [c for c in results["cells"] if not c["diverged"]]
    out = []
    scored = [c for c in cells if c.get("mmcs") is not None]
    if scored:
        ratios = sorted({c["ratio"] for c in scored})
        r1 = min(ratios, key=lambda r: abs(np.log(r)))
        at1 = sorted((c for c in scored if c["ratio"] == r1), key=lambda c: c[key])
        best = max(at1, key=lambda c: c["mmcs"])
        out.append(f"At ratio {r1:g} the best MMCS is {best['mmcs']:.3f}, at {name} {best[key]:.3g}.")
        band = [c[key] for c in at1 if c["mmcs"] >= 0.95]
        if band:
            out.append(f"MMCS >= 0.95 holds for {name} in [{min(band):.3g}, {max(band):.3g}] "
                       f"({np.log10(max(band) / min(band)):.2f} decades) at ratio {r1:g}.")
        dead_in_band = [c for c in at1 if c["mmcs"] >= 0.95 and c["dead"] > 0]
        # sparser than the band: a larger alpha or lambda, a smaller k
        sparser = [c for c in at1 if band and (c[key] < min(band) if key == "k" else c[key] > max(band))]
        out.append(f"Dead latents inside that band: {len(dead_in_band)} cells; on its sparse side: "
                   f"{sum(1 for c in sparser if c['dead'] > 0)} of {len(sparser)} cells.")
        if dead_in_band:
            worst = max(c["dead"] for c in dead_in_band)
            settings = ", ".join(f"{c[key]:.3g}" for c in dead_in_band)
            out.append(f"This differs from the report, which saw no dead latents at ratio {r1:g} inside "
                       f"the band: here up to {worst} of {dead_in_band[0]['dict_size']} latents are dead at "
                       f"{name} {settings} (figure 4), while MMCS "
                       "stays high (probably latents of rare features that the sparsity pressure silenced).")
        for r in ratios:
            col = [c["mmcs"] for c in scored if c["ratio"] == r]
            out.append(f"Ratio {r:g}: best MMCS over {name} {max(col):.3f}.")
    if not scored and cells:
        with_dead = [c for c in cells if c["dead"] > 0]
        out.append(f"{len(with_dead)} of {len(cells)} cells have dead latents"
                   + (f"; the smallest {name} with any is {min(c[key] for c in with_dead):.3g}." if with_dead else "."))
        larger = [c for c in cells if c.get("mmcs_with_larger") is not None]
        if larger:
            top = max(larger, key=lambda c: c["mmcs_with_larger"])
            out.append(f"MMCS with larger dictionaries peaks at {top['mmcs_with_larger']:.3f} "
                       f"(ratio {top['ratio']:g}, {name} {top[key]:.3g}); on toy data it approaches 1 "
                       "where the features are recovered.")
    s = results.get("suggested") or {}
    if s.get("ratio") is not None:
        out.append(f"Without ground truth the methods suggest ratio {s['ratio']:g}, {name} {s[key]:.3g} "
                   f"({s['summary']}).")
        opt = results.get("ground_truth_optimum")
        if opt and s.get("mmcs") is not None:
            out.append(f"That cell's MMCS is {s['mmcs']:.3f}; the grid's best is {opt['mmcs']:.3f} "
                       f"(ratio {opt['ratio']:g}, {name} {opt[key]:.3g}), a gap of {opt['mmcs'] - s['mmcs']:.3f}.")
    if results.get("diverged_cells"):
        out.append(f"Diverged cells (skipped in figures, marked x): {results['diverged_cells']}.")
    return out


def write(out_dir: str, results: dict, figures: dict[str, str], title: str,
          notes: list[str] | None = None) -> str:
    """Writes DIR/REPORT.md and returns its path."""
    from sae_jax import archs

    lines = [f"# {title}", ""]
    cfg = results.get("config", {})
    lines += ["## Configuration", "", "```", *(f"{k}: {v}" for k, v in cfg.items()), "```", ""]
    names = list(dict.fromkeys(c.get("arch", archs.DEFAULT) for c in results["cells"]))
    per_arch = results.get("by_arch") or {names[0]: {"suggested": results.get("suggested"),
                                                     "ground_truth_optimum": results.get("ground_truth_optimum")}}
    if len(names) > 1:
        lines += ["## Architectures side by side", "", *architecture_table(results), ""]
    for arch in names:
        key, name = archs.get(arch).sparsity_key, archs.get(arch).sparsity_name
        view = {**results, **per_arch[arch],
                "cells": [c for c in results["cells"] if c.get("arch", archs.DEFAULT) == arch]}
        head = "" if len(names) == 1 else f" ({arch})"
        lines += [f"## What the figures show{head}", "",
                  *(f"- {r}" for r in reading(view, key, name) + (notes if arch == names[0] and notes else [])), ""]
        s = per_arch[arch].get("suggested") or {}
        if s.get("methods"):
            lines += [f"## Hyperparameters chosen without ground truth{head}", "",
                      f"| method | ratio | {name} | rule |", "|---|---|---|---|"]
            for m in s["methods"]:
                lines.append(f"| {m['method']} | {_fmt(m['ratio'], 'g')} | {_fmt(m[key], '.3g')} | {m['why']} |")
            lines.append(f"| **combined** | {_fmt(s.get('ratio'), 'g')} | {_fmt(s.get(key), '.3g')} | "
                         f"{s.get('summary', '')} |")
            opt = per_arch[arch].get("ground_truth_optimum")
            if opt:
                lines.append(f"| ground-truth optimum | {opt['ratio']:g} | {opt[key]:.3g} | "
                             f"best MMCS {opt['mmcs']:.3f} (cell {opt['cell']}) |")
            lines.append("")
    lines += ["## Figures", ""]
    for fig, path in figures.items():
        lines += [f"### {fig}", "", f"![{fig}]({os.path.relpath(path, out_dir)})", ""]
    cols = CELL_COLUMNS if names == [archs.DEFAULT] else CELL_COLUMNS[:1] + ARCH_COLUMNS + CELL_COLUMNS[1:]
    lines += ["## The grid", "", *table(results["cells"], cols), ""]
    if results.get("denoising"):
        lines += ["## Denoising appendix", "",
                  *table(results["denoising"]["cells"],
                          [("l1", "alpha", ".3g"), ("noise", "noise std", "g"), ("mmcs", "MMCS", ".3f"),
                           ("dead", "dead", ""), ("fvu", "FVU", ".3f")]), ""]
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


ARCH_COLUMNS = [("arch", "arch", ""), ("k", "k", ""), ("l0_coeff", "lambda", ".3g")]


def architecture_table(results: dict) -> list[str]:
    """Per architecture (in the grid's order): its best cell by MMCS with ground truth (or, without
    it, its suggested cell) with dead latents, L0 and explained variance, and its suggestion."""
    from sae_jax import archs

    names = list(dict.fromkeys(c.get("arch", archs.DEFAULT) for c in results["cells"]))
    by_arch = results.get("by_arch") or {}
    out = ["| architecture | best MMCS | at (ratio, setting) | dead | L0 | expl. var. "
           "| suggested (ratio, setting) | suggested MMCS |",
           "|---|---|---|---|---|---|---|---|"]
    for arch in names:
        key, name = archs.get(arch).sparsity_key, archs.get(arch).sparsity_name
        res = by_arch.get(arch) or {"suggested": results.get("suggested"),
                                    "ground_truth_optimum": results.get("ground_truth_optimum")}
        opt, s = res.get("ground_truth_optimum"), res.get("suggested") or {}
        cell = next((c for c in results["cells"] if opt and c["index"] == opt["cell"]), None)
        at = f"{opt['ratio']:g}, {name} {opt[key]:.3g}" if opt else "–"
        sug = (f"{s['ratio']:g}, {name} {s[key]:.3g}" if s.get("ratio") is not None else "–")
        out.append(f"| {arch} | {_fmt(opt and opt['mmcs'], '.4f')} | {at} | {_fmt(cell and cell['dead'])} | "
                   f"{_fmt(cell and cell['l0'], '.2f')} | {_fmt(cell and cell.get('explained_variance'), '.4f')} | "
                   f"{sug} | {_fmt(s.get('mmcs'), '.4f')} |")
    return out
