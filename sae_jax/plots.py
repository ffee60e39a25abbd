"""The report's figures, drawn from a results dict (see sae_jax.results).

Heatmaps put alpha (or another architecture's sparsity setting: k, lambda) on the y axis and the
dictionary ratio on the x axis, as in the report. A grid of several architectures gets one set
of figures per architecture: the first in figures/, the others in figures/<arch>/.
Diverged cells are drawn as a grey 'x' so that a skipped cell is visible, never silently blank.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae_jax import archs, metrics, quality  # noqa: E402

# name -> (cell key, title, colour map) for the (alpha x ratio) heatmaps.
HEATMAPS = {
    "fig03_mmcs_heatmap": ("mmcs", "MMCS with ground truth", "viridis"),
    "fig04_dead_latents": ("dead", "Dead latents", "magma"),
    "fig07_std_log_recon": ("std_log_recon", "Standardised log reconstruction loss", "coolwarm"),
    "fig08_std_log_l1": ("std_log_l1", "Standardised log L1 loss", "coolwarm"),
    "fig09_ssll": ("ssll", "SSLL (summed standardised log losses)", "coolwarm"),
    "fig10_mmcs_with_larger": ("mmcs_with_larger", "MMCS with larger dictionaries", "viridis"),
}
LM_HEATMAPS = {
    "fig11_lm_dead_latents": HEATMAPS["fig04_dead_latents"],
    "fig12_lm_ssll": HEATMAPS["fig09_ssll"],
    "fig13_lm_mmcs_with_larger": HEATMAPS["fig10_mmcs_with_larger"],
}


def _axes(cells: list[dict], x_key: str = "ratio", y_key: str = "l1") -> tuple[list[float], list[float]]:
    return sorted({c[y_key] for c in cells}), sorted({c[x_key] for c in cells})


def _value(c: dict, key: str) -> float:
    return np.nan if c["diverged"] or c.get(key) is None else float(c[key])


def heatmap(cells: list[dict], key: str, title: str, path: str, cmap: str = "viridis",
            x_key: str = "ratio", x_label: str = "dictionary size / features",
            mark: dict | None = None, y_key: str = "l1", y_label: str = "L1 coefficient alpha") -> str:
    """One (y_key x x_key) heatmap of cells[key] (y_key: alpha by default), averaged over seeds."""
    l1_axis, x_axis = _axes(cells, x_key, y_key)
    vals = metrics.plane([_value(c, key) for c in cells], [c[y_key] for c in cells],
                         [c[x_key] for c in cells], l1_axis, x_axis)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(x_axis), 1.2 + 0.35 * len(l1_axis)))
    im = ax.imshow(vals, origin="lower", aspect="auto", cmap=cmap)
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(x_axis)), [f"{x:g}" for x in x_axis])
    ax.set_yticks(range(len(l1_axis)), [f"{a:.3g}" for a in l1_axis])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    for c in cells:
        if c["diverged"]:
            ax.text(x_axis.index(c[x_key]), l1_axis.index(c[y_key]), "x", ha="center",
                    va="center", color="grey", fontsize=12)
    if mark is not None and mark.get("ratio") is not None and x_key == "ratio":
        ax.plot(x_axis.index(mark["ratio"]), l1_axis.index(mark[y_key]), marker="s", ms=14,
                mfc="none", mec="red", mew=2)
        ax.set_title(f"{title}\n(red square: suggested without ground truth)", fontsize=9)
    return _save(fig, path)


def lines(cells: list[dict], key: str, x_key: str, series_key: str, path: str, title: str,
          logy: bool = False, only: dict | None = None, x_label: str | None = None) -> str:
    """cells[key] against x_key, one line per value of series_key (log x axis)."""
    cells = [c for c in cells if all(c[k] == v for k, v in (only or {}).items())]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s in sorted({c[series_key] for c in cells}):
        pts = sorted((c[x_key], _value(c, key)) for c in cells if c[series_key] == s)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{series_key} {s:g}")
    ax.set_xscale("log")
    xs_all = sorted({c[x_key] for c in cells})
    ax.set_xticks(xs_all, [f"{x:.3g}" for x in xs_all])
    ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x_label or x_key)
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _per_arch(results: dict, fig_dir: str, draw) -> dict[str, str]:
    """draw(cells, mark, sub_dir, arch) -> {name: path} for each architecture's cells: the first
    architecture's figures in fig_dir, the others' in fig_dir/<arch>/ (names prefixed "<arch>/")."""
    names = list(dict.fromkeys(c.get("arch", archs.DEFAULT) for c in results["cells"]))
    out = {}
    for i, arch in enumerate(names):
        mark = results.get("suggested") if i == 0 else results["by_arch"][arch]["suggested"]
        cells = [c for c in results["cells"] if c.get("arch", archs.DEFAULT) == arch]
        sub = fig_dir if i == 0 else os.path.join(fig_dir, arch)
        figs = draw(cells, mark, sub, arch)
        record = archs.get(arch)
        figs.update(quality.density_figure({"cells": cells}, sub, record.sparsity_key, record.sparsity_name))
        out.update({(name if i == 0 else f"{arch}/{name}"): p for name, p in figs.items()})
    return out


def toy_figures(results: dict, fig_dir: str) -> dict[str, str]:
    """Figures 1-10 per architecture (`_per_arch`), and the denoising appendix when present.
    Returns name -> path."""
    out = _per_arch(results, fig_dir, _arch_figures)
    if results.get("denoising"):
        out["appendix_denoising"] = heatmap(
            results["denoising"]["cells"], "mmcs", "Denoising: MMCS (dictionary size = h)",
            f"{fig_dir}/appendix_denoising.png", x_key="noise", x_label="input noise std")
    return dict(sorted(out.items()))


def _arch_figures(cells: list[dict], mark: dict | None, fig_dir: str, arch: str) -> dict[str, str]:
    """The report's figures 1-10 for one architecture's cells, its sparsity setting as alpha."""
    record = archs.get(arch)
    y, name, label, pre = record.sparsity_key, record.sparsity_name, record.sparsity_label, record.title
    out = {}
    ratios = sorted({c["ratio"] for c in cells})
    r1 = min(ratios, key=lambda r: abs(np.log(r)))
    out["fig01_mmcs_vs_l1"] = lines(cells, "mmcs", y, "ratio", f"{fig_dir}/fig01_mmcs_vs_l1.png",
                                    f"{pre}MMCS against {name} (ratio {r1:g})", only={"ratio": r1}, x_label=label)
    out["fig02_mmcs_vs_ratio"] = lines(cells, "mmcs", "ratio", y, f"{fig_dir}/fig02_mmcs_vs_ratio.png",
                                       f"{pre}MMCS against dictionary size / features")
    out["fig05_recon_vs_l1"] = lines(cells, "recon_loss", y, "ratio", f"{fig_dir}/fig05_recon_vs_l1.png",
                                     f"{pre}Reconstruction loss against {name}", logy=True, x_label=label)
    out["fig06_l1_vs_l1"] = lines(cells, "l1_loss", y, "ratio", f"{fig_dir}/fig06_l1_vs_l1.png",
                                  f"{pre}L1 loss against {name}", logy=True, x_label=label)
    for fig, (key, title, cmap) in HEATMAPS.items():
        if any(c.get(key) is not None for c in cells):
            out[fig] = heatmap(cells, key, pre + title, f"{fig_dir}/{fig}.png", cmap, mark=mark,
                               y_key=y, y_label=label)
    return out


def lm_figures(results: dict, fig_dir: str) -> dict[str, str]:
    """Figures 11-13 on activations without ground truth, plus the loss curves, per architecture."""
    def draw(cells: list[dict], mark: dict | None, sub: str, arch: str) -> dict[str, str]:
        record = archs.get(arch)
        y, name, label = record.sparsity_key, record.sparsity_name, record.sparsity_label
        figs = {fig: heatmap(cells, key, f"LM activations: {title}", f"{sub}/{fig}.png", cmap,
                             mark=mark, y_key=y, y_label=label)
                for fig, (key, title, cmap) in LM_HEATMAPS.items()}
        figs["lm_recon_vs_l1"] = lines(cells, "recon_loss", y, "ratio", f"{sub}/lm_recon_vs_l1.png",
                                       f"LM activations: reconstruction loss against {name}", logy=True,
                                       x_label=label)
        return figs
    return _per_arch(results, fig_dir, draw)
