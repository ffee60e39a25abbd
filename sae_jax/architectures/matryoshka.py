"""matryoshka: Matryoshka BatchTopK (Bussmann et al. 2025; SAELens's
`MatryoshkaBatchTopKTrainingSAE`, dictionary_learning's `MatryoshkaBatchTopKSAE`).

BatchTopK's codes c (the k*B largest pre-activations of the batch), with the dictionary's first
w_1 < w_2 < ... < w_L = m latents taken as nested prefixes, each of which reconstructs alone:

    x^_l = sum_{j < w_l} c_j a_j + b_dec,        a_j = D_j / ||D_j||,
    L    = (1/d)||t - x^_L||^2 + sum_{l < L} (1/d)||t - x^_l||^2 (+ AuxK),

so the first latents learn what they can reconstruct without the rest (frequent, general
features) and later ones refine them instead of absorbing them. w_l = round(f_l m) for the
fractions f_l of the option `widths` (default 1/32, 1/8, 1/2, 1: SynthSAEBench's 128, 512,
2,048 and 4,096 of 4,096), the whole dictionary always last; fractions that round to the same
prefix count once. Inference, the threshold and the exports are BatchTopK's: c = p [p > theta]
(SAELens saves it as `jumprelu`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.architectures.base import CellArch
from sae_jax.architectures.batchtopk import BatchTopK
from sae_jax.errors import UsageError

if TYPE_CHECKING:
    from sae_jax.sparse_coo import BatchTopKRows

Array = jax.Array
DEFAULT_WIDTHS = (1 / 32, 1 / 8, 1 / 2, 1.0)


def level_widths(m: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """The prefix sizes w_l = round(f_l m) (at least 1), strictly increasing, m last."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UsageError(f"`matryoshka_widths` must be fractions of the dictionary in (0, 1], got "
                         f"{', '.join(f'{f:g}' for f in fractions) or 'none'}", field="matryoshka_widths")
    return tuple(sorted({min(m, max(1, round(f * m))) for f in fractions} | {m}))


def inner_sq_err(c_BxM: Array, atoms_MxD: Array, resid_BxD: Array, widths: Sequence[int]) -> Array:
    """sum_{l < L} mean_b (1/d)||r - sum_{j < w_l} c_j a_j||^2 (dense codes; the prefixes'
    decodings accumulate segment by segment: one decode of the first w_{L-1} latents)."""
    total, partial, start = jnp.zeros((), jnp.float32), jnp.zeros_like(resid_BxD), 0
    for w in widths[:-1]:
        partial = partial + c_BxM[:, start:w] @ atoms_MxD[start:w]
        total = total + jnp.mean(jnp.square(resid_BxD - partial))
        start = w
    return total


@dataclasses.dataclass(frozen=True)
class MatryoshkaBatchTopK(BatchTopK):
    def widths(self, arch: CellArch, m: int) -> tuple[int, ...]:
        """The group's prefix sizes for a dictionary of m latents."""
        return level_widths(m, self.option(arch, "widths"))

    def check(self, arch: CellArch, dict_size: int) -> None:
        self.widths(arch, dict_size)

    def codes_loss(self, params: sae.SAEParams, c_BxM: Array, resid_BxD: Array, arch: CellArch) -> Array:
        widths = self.widths(arch, c_BxM.shape[-1])
        return inner_sq_err(c_BxM, sae.unit_rows(params.D_MxD), resid_BxD, widths)

    def rows_loss(self, params: sae.SAEParams, c: BatchTopKRows, resid_BxD: Array, batch: int,
                  arch: CellArch, compute_dtype: str) -> Array:
        """The inner prefixes from the codes of the first w_{L-1} latents scattered into a dense
        (B, w_{L-1}) block (a few per sample), then `inner_sq_err`'s segment-by-segment GEMMs: one
        small GEMM per level instead of a pass of the sparse decoder over every code per level."""
        from sae_jax import sparse_unit

        widths = self.widths(arch, params.D_MxD.shape[0])
        w = widths[-2] if len(widths) > 1 else 0
        if not w:
            return jnp.zeros((), jnp.float32)
        inner = c.latent_RxJ < w
        rows = jnp.broadcast_to(c.sample_R[:, None], c.latent_RxJ.shape)
        codes_BxW = jnp.zeros((batch, w), jnp.float32).at[rows, jnp.where(inner, c.latent_RxJ, 0)].add(
            jnp.where(inner, c.vals_RxJ, 0.0))
        return inner_sq_err(codes_BxW, sparse_unit.unit_rows(params.D_MxD[:w]), resid_BxD, widths)

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """MatryoshkaBatchTopKSAE: W_enc (d, m), b_enc, W_dec (m, d), b_dec, k, one threshold and
        the prefixes' group sizes (its encoder subtracts b_dec itself)."""
        sd = super().dictionary_learning(w, arch)
        m = w["W_enc"].shape[0]
        return {"W_enc": np.ascontiguousarray(sd["encoder.weight"].T), "b_enc": sd["encoder.bias"],
                "W_dec": np.ascontiguousarray(sd["decoder.weight"].T), "b_dec": sd["b_dec"], "k": sd["k"],
                "threshold": sd["threshold"],
                "group_sizes": np.diff((0,) + self.widths(arch, m)).astype(np.int64)}


MATRYOSHKA = MatryoshkaBatchTopK(
    name="matryoshka", sparsity_key="k", sparsity_name="k", sparsity_label="k (mean active latents)",
    title="matryoshka: ", uses_k=True, has_threshold=True, default_aux_k_coeff=1 / 32,
    sparse_decoder=True, saelens_arch="jumprelu", dl_class="MatryoshkaBatchTopKSAE",
    options=(("widths", DEFAULT_WIDTHS),),
    option_help=(("widths", "Matryoshka's nested prefixes as fractions of the dictionary (default "
                            "1/32, 1/8, 1/2, 1; the whole is always last)"),))
