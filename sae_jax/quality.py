"""The metrics SAE users compare on, per cell, without a language model; and a latent-density figure.

On an evaluation batch x (N, d), with x̂ = decode(encode(x)) and c = encode(x):

    explained_variance  = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)
                          numerator and denominator averaged separately over the batch, then divided
                          (not a mean of per-sample ratios, the bug SAELens and SAEBench once had)
    l2_ratio            = E[‖x̂‖ / ‖x‖]                 over samples with ‖x‖ > 0
    rel_recon_bias      = E‖x̂‖² / E⟨x, x̂⟩              1 when x̂ is unbiased in scale; > 1 overshoots
    frac_alive          = fraction of latents with c_j > 0 on some sample of the batch
    density_hist        = counts of log10(firing frequency) of the live latents in DENSITY_BINS

The density figure draws, per dictionary size, each α's histogram of latent firing frequencies.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import archs, sae

Array = jax.Array
DENSITY_BINS = np.linspace(-6.0, 0.0, 25)  # log10 firing frequency (outer bins open); dead latents excluded
KEYS = ("explained_variance", "l2_ratio", "rel_recon_bias", "frac_alive")


def cell_quality(params: sae.SAEParams, x_NxD: Array, arch: archs.Arch = archs.RELU_L1) -> dict[str, Array]:
    """The KEYS above, plus "firing_freq" (m,) and "density_hist" (len(DENSITY_BINS) − 1,), for one cell."""
    x = x_NxD.astype(jnp.float32)
    c = archs.encode(params, x, arch)
    x_hat = sae.decode(params, c)
    err = jnp.mean(jnp.sum(jnp.square(x - x_hat), -1))
    total = jnp.mean(jnp.sum(jnp.square(x), -1)) - jnp.sum(jnp.square(jnp.mean(x, 0)))
    norm_x, norm_hat = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(x_hat, axis=-1)
    nz = norm_x > 0
    freq = jnp.mean((c > 0).astype(jnp.float32), 0)
    log_f = jnp.log10(jnp.where(freq > 0, freq, 1.0))[:, None]
    lo = jnp.asarray(DENSITY_BINS[:-1]).at[0].set(-jnp.inf)
    hi = jnp.asarray(DENSITY_BINS[1:]).at[-1].set(jnp.inf)
    hist = jnp.sum((log_f >= lo) & (log_f < hi) & (freq > 0)[:, None], axis=0)
    return {
        "explained_variance": 1.0 - err / total,
        "l2_ratio": jnp.sum(jnp.where(nz, norm_hat / jnp.where(nz, norm_x, 1.0), 0.0)) / jnp.maximum(nz.sum(), 1),
        "rel_recon_bias": jnp.mean(jnp.sum(jnp.square(x_hat), -1)) / jnp.mean(jnp.sum(x * x_hat, -1)),
        "frac_alive": jnp.mean((freq > 0).astype(jnp.float32)),
        "firing_freq": freq,
        "density_hist": hist,
    }


_group_quality = jax.jit(jax.vmap(cell_quality, in_axes=(0, None, None)), static_argnums=2)


def annotate(cells: list[dict], state, spec, x_eval: Array) -> None:
    """Add the KEYS and "density_hist" to each cell dict of `results.evaluate` (one transfer per group)."""
    per_group = [jax.device_get(_group_quality(g.params, jnp.asarray(x_eval), g.arch)) for g in state.groups]
    for cell, c in zip(cells, spec.cells()):
        q = {k: v[c.slot] for k, v in per_group[c.group].items()}
        ok = not cell.get("diverged")
        for k in KEYS:
            v = float(q[k])
            cell[k] = v if ok and np.isfinite(v) else None
        cell["density_hist"] = [int(n) for n in q["density_hist"]] if ok else None


def density_figure(results: dict, fig_dir: str, y_key: str = "l1", y_name: str = "α") -> dict[str, str]:
    """figures/latent_density.png: per dictionary size, each α's (or k's, λ's: `y_key`) histogram
    of log10 firing frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c.get("density_hist") is not None and not c.get("noise")]
    if not cells:
        return {}
    sizes = sorted({c["dict_size"] for c in cells})
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), squeeze=False, sharey=False)
    centres = (DENSITY_BINS[:-1] + DENSITY_BINS[1:]) / 2
    alphas = sorted({c[y_key] for c in cells})
    cmap = plt.get_cmap("viridis")
    seed = min(c["seed"] for c in cells)
    for ax, m in zip(axes[0], sizes):
        for c in (c for c in cells if c["dict_size"] == m and c["seed"] == seed):
            colour = cmap(alphas.index(c[y_key]) / max(len(alphas) - 1, 1))
            ax.step(centres, c["density_hist"], where="mid", color=colour, label=f"{y_name} {c[y_key]:.3g}")
        ax.set_title(f"m = {m}")
        ax.set_xlabel("log10 firing frequency")
    axes[0][0].set_ylabel("live latents")
    axes[0][-1].legend(fontsize=6)
    path = os.path.join(fig_dir, "latent_density.png")
    os.makedirs(fig_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"latent_density": path}
