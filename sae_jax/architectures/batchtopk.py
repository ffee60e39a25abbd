"""batchtopk (Bussmann et al. 2024). Training: c = ReLU(p) where p is among the k*B largest of
the whole batch, 0 elsewhere; S = 0. Inference: c = p * [p > theta], theta the running mean of
the batches' smallest kept activation max(N-th largest p, 0), N = k*B: after each step
theta <- theta + w (stat - theta), w = max(1 - decay, 1/(step + 1)) (a plain mean, then an
exponential one).

AuxK at 1/32 by default, as TopK's; without it, the sparse decoder (`sae_jax.sparse_coo`'s
row layout) with the native kernels.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.architectures.base import (
    Architecture,
    CellArch,
    SparseOut,
    ThresholdEncode,
    batch_topk_mask,
    folded_bias,
    pre_acts,
    residual_target,
)
from sae_jax.architectures.topk import topk_state_dict
from sae_jax.errors import UsageError

if TYPE_CHECKING:
    from sae_jax.sparse_coo import BatchTopKRows


@dataclasses.dataclass(frozen=True)
class BatchTopK(ThresholdEncode, Architecture):
    def train_codes(self, params: sae.SAEParams, x_BxD: jax.Array, coeff: jax.Array, arch: CellArch,
                    convention: str, eps: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        pre = pre_acts(params, x_BxD)
        mask, kth = batch_topk_mask(pre, arch.k)
        zero = jnp.zeros((), jnp.float32)
        return jnp.where(mask, jax.nn.relu(pre), 0.0), pre, zero, jax.lax.stop_gradient(jnp.maximum(kth, 0.0))

    def sparse_auto(self, arch: CellArch, m: int) -> bool:
        """With the native kernels (through XLA's it is never the faster)."""
        from sae_jax import sparse

        return sparse.native_in_use()

    def sparse_loss(self, params: sae.SAEParams, x_BxD: jax.Array, t_BxD: jax.Array, arch: CellArch,
                    convention: str, compute_dtype: str) -> SparseOut:
        """The same values and batch statistic as the dense formulation."""
        from sae_jax import sparse_coo, sparse_unit

        m, batch = params.W_enc_MxD.shape[0], x_BxD.shape[0]
        c = sparse_coo.batchtopk_rows(params.W_enc_MxD, folded_bias(params), x_BxD, min(arch.k, m), compute_dtype)
        t_BxD = residual_target(params, t_BxD)
        x_hat = sparse_coo.decode_rows(sparse_unit.unit_rows(params.D_MxD), c.vals_RxJ, c.latent_RxJ,
                                       c.sample_R, batch, compute_dtype)
        extra = self.rows_loss(params, c, t_BxD, batch, arch, compute_dtype)
        active = c.vals_RxJ > 0
        fired = jnp.zeros((m,), bool).at[c.latent_RxJ.reshape(-1)].max(active.reshape(-1))
        l1 = jnp.sum(c.vals_RxJ) / batch / (m if convention == "report" else 1)
        sq_B = jnp.sum(jnp.square(t_BxD - x_hat), axis=-1)
        aux = sae.LossAux(jnp.mean(sq_B) / t_BxD.shape[-1], l1,
                          jnp.sum(active).astype(jnp.float32) / batch, fired, sq_B)
        total = aux.mse if extra is None else aux.mse + extra
        return total, (aux, jnp.maximum(c.threshold, 0.0)), t_BxD - x_hat

    def rows_loss(self, params: sae.SAEParams, c: BatchTopKRows, resid_BxD: jax.Array,
                  batch: int, arch: CellArch, compute_dtype: str) -> jax.Array | None:
        """`codes_loss` on the sparse path: terms beyond (1/d)||t - x^||^2 that read the codes in
        `sparse_coo`'s row layout and r = t - b_dec; None (the default): none."""
        return None

    def track_threshold(self, old: sae.SAEParams, new: sae.SAEParams, stat: jax.Array,
                        diverged: jax.Array, decay: float, step: jax.Array) -> sae.SAEParams:
        """theta moves towards the batch's smallest kept activation (a diverged cell's stays)."""
        theta = jnp.exp(old.log_threshold_M)
        w = jnp.maximum(1.0 - decay, 1.0 / (step.astype(jnp.float32) + 1.0))
        theta = jnp.where(diverged, theta, theta + w * (stat - theta))
        return new._replace(log_threshold_M=jnp.log(jnp.maximum(theta, 1e-30)))

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """BatchTopKSAE, which holds one threshold (every latent's here)."""
        theta = w["threshold"][0]
        if not np.allclose(w["threshold"], theta, rtol=1e-6, atol=0):
            raise UsageError("dictionary_learning's BatchTopKSAE holds one threshold; "
                             "this cell's thresholds differ by latent")
        return topk_state_dict(w, arch, theta)


# (SAELens has no BatchTopK architecture at inference: a trained one is saved as JumpReLU.)
BATCHTOPK = BatchTopK(
    name="batchtopk", sparsity_key="k", sparsity_name="k", sparsity_label="k (mean active latents)",
    title="batchtopk: ", uses_k=True, has_threshold=True, default_aux_k_coeff=1 / 32,
    sparse_decoder=True, saelens_arch="jumprelu", dl_class="BatchTopKSAE")
