"""The SAE architectures a grid can hold, as pure functions of one cell: the registry's records
(`sae_jax.architectures`) behind one call each.

Every architecture shares the report's parameters (encoder W_e, b_e; decoder atoms D normalised
on the forward pass; optionally a decoder bias b_dec, `sae.SAEParams`) and differs in how codes
are made from the pre-activations p = W_e (x - b_dec) + b_e and in the sparsity term of the loss
L = (1/d)||t - x^||^2 + S, x^ = D^ c + b_dec:

    relu_l1    c = ReLU(p)                                  S = alpha * L1(c)   (the report's)
    topk       c = ReLU(p) on the k largest p_j, 0 elsewhere  S = 0             (Gao et al. 2024)
    batchtopk  training: ReLU(p) kept where it is among the k*B largest of the whole batch;
               inference: c = ReLU(p) * [p > theta], theta the running mean of the smallest
               kept activation                              S = 0             (Bussmann et al. 2024)
    jumprelu   c = p * H(p - theta_j),  theta = exp(log_theta)
                                                            S = lambda * L0(c) (Rajamanoharan et al. 2024)

(each record's module states its own). L1 and L0 follow the grid's convention: divided by m
("report") or not ("sum").

AuxK (Gao et al.), for the records with a nonzero AuxK coefficient: with e = t - x^ (no
gradient) and the dead latents' codes ReLU(p) restricted to their k_aux largest,
e^ = decode(those codes),
    L_aux = coeff * mean_b ||e - e^||^2 / mean_b ||e - mean(e)||^2      (0 when none is dead).
TopK and BatchTopK take it by default (coeff 1/32, Gao et al.'s) where resampling is off
(`TrainConfig.arch_options`): their codes pass gradient only to the selected latents, so a
latent that drops out of every sample's top k early in training never moves again, and on small
worlds a quarter of the dictionary died that way (README: "Dead latents"). JumpReLU keeps it off
unless asked; relu_l1 never takes it (a dead ReLU latent has ReLU(p) = 0 on every input).

The static part of an architecture (its name, k and options) is an `Arch`; per-cell numbers
(alpha or lambda) are traced, so cells of one (arch, size, k) group train in one vmapped step.
"""

from __future__ import annotations

import jax

from sae_jax import sae
from sae_jax.architectures import DEFAULT, REGISTRY, Arch, get, names
from sae_jax.architectures.base import (
    SPARSE_AUTO_RATIO,
    SPARSE_MODES,
    Architecture,
    ArchOptions,
    aux_k_loss,
    aux_k_loss_gathered,
    batch_topk_mask,
    folded_bias,
    pre_acts,
    threshold,
    topk_mask,
)

__all__ = ["ARCHS", "Arch", "ArchOptions", "Architecture", "DEFAULT", "RELU_L1", "SPARSE_AUTO_RATIO",
           "SPARSE_MODES", "aux_k_coeff", "aux_k_loss", "aux_k_loss_gathered",
           "batch_topk_mask", "encode", "folded_bias", "get",
           "loss", "names", "pre_acts", "threshold", "topk_mask", "train_codes", "uses_sparse"]

Array = jax.Array
RELU_L1 = Arch()

# Views of the registry as it is at import, for scripts and tests (the library asks the records):
ARCHS = names()
TOPK_ARCHS = tuple(r.name for r in REGISTRY if r.uses_k)
SPARSITY_KEY = {r.name: r.sparsity_key for r in REGISTRY}
SPARSITY_NAME = {r.name: r.sparsity_name for r in REGISTRY}
SPARSITY_LABEL = {r.name: r.sparsity_label for r in REGISTRY}
DEFAULT_AUX_K_COEFF = {r.name: r.default_aux_k_coeff for r in REGISTRY if r.default_aux_k_coeff}


def aux_k_coeff(arch: Arch, opts: ArchOptions) -> float:
    """The cell's AuxK coefficient: the one given, else its record's default (1/32 for topk and
    batchtopk, 0 (off) for the others)."""
    return arch.record.aux_k_coeff(opts)


def encode(params: sae.SAEParams, x_BxD: Array, arch: Arch = RELU_L1) -> Array:
    """Inference codes (B, m) of any architecture (batchtopk: the thresholded form)."""
    return arch.record.encode(params, x_BxD, arch)


def train_codes(params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: Arch, convention: str,
                eps: float) -> tuple[Array, Array, Array, Array]:
    """(codes (B, m) as trained, pre-activations, the sparsity term S, the batch statistic that
    a threshold tracks (batchtopk's smallest kept activation; 0 otherwise))."""
    return arch.record.train_codes(params, x_BxD, coeff, arch, convention, eps)


def uses_sparse(arch: Arch, m: int, opts: ArchOptions) -> bool:
    """Whether a cell of m latents trains through the sparse decoder (`Architecture.uses_sparse`:
    topk and batchtopk without AuxK; "auto" on the CPU: always with the native kernels, else
    TopK where k <= m / 64)."""
    return arch.record.uses_sparse(arch, m, opts)


def loss(params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: Arch, convention: str = "report",
         target_BxD: Array | None = None, opts: ArchOptions = ArchOptions(),
         dead_M: Array | None = None) -> tuple[Array, tuple[sae.LossAux, Array]]:
    """L = (1/d)||t - x^||^2 + S (+ L_aux) for one cell of any architecture; aux as `sae.loss`'s,
    plus the batch statistic a threshold tracks (batchtopk's smallest kept activation).
    relu_l1's is exactly `sae.loss`."""
    return arch.record.loss(params, x_BxD, coeff, arch, convention, target_BxD, opts, dead_M)
