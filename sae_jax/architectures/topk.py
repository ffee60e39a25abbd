"""topk (Gao et al. 2024): c = ReLU(p) on each sample's k largest p_j, 0 elsewhere; S = 0.

AuxK at 1/32 by default: its codes pass gradient only to the selected latents, so a latent that
drops out of every sample's top k early never moves again. Without AuxK it may train through
the sparse decoder (`sae_jax.sparse`): k of m atoms gathered per sample.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.architectures.base import (
    SPARSE_AUTO_RATIO,
    Architecture,
    CellArch,
    SparseOut,
    decoder_bias,
    folded_bias,
    pre_acts,
    residual_target,
    topk_mask,
)


@dataclasses.dataclass(frozen=True)
class TopK(Architecture):
    def _codes(self, pre: jax.Array, arch: CellArch) -> jax.Array:
        return jnp.where(topk_mask(pre, min(arch.k, pre.shape[-1])), jax.nn.relu(pre), 0.0)

    def encode(self, params: sae.SAEParams, x_BxD: jax.Array, arch: CellArch) -> jax.Array:
        return self._codes(pre_acts(params, x_BxD), arch)

    def train_codes(self, params: sae.SAEParams, x_BxD: jax.Array, coeff: jax.Array, arch: CellArch,
                    convention: str, eps: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        pre = pre_acts(params, x_BxD)
        zero = jnp.zeros((), jnp.float32)
        return self._codes(pre, arch), pre, zero, zero

    def sparse_auto(self, arch: CellArch, m: int) -> bool:
        """Always with the native kernels (1.6x the dense step's speed at k = m/8, 2.2x at m/16,
        benchmarks/grid_step.py), else where k <= m / 64."""
        from sae_jax import sparse

        return sparse.native_in_use() or arch.k * SPARSE_AUTO_RATIO <= m

    def sparse_loss(self, params: sae.SAEParams, x_BxD: jax.Array, t_BxD: jax.Array, arch: CellArch,
                    convention: str, compute_dtype: str) -> SparseOut:
        """Gradients by scatter-adds into the k selected rows per sample."""
        from sae_jax import sparse, sparse_unit

        m = params.W_enc_MxD.shape[0]
        vals, idx = sparse.topk_codes(params.W_enc_MxD, folded_bias(params), x_BxD, min(arch.k, m), compute_dtype)
        r_BxD = residual_target(params, t_BxD)
        sq_B = sparse_unit.decode_sq_err_unit(params.D_MxD, vals, idx, r_BxD, compute_dtype)
        active = vals > 0
        l1 = jnp.mean(jnp.sum(vals, axis=-1)) / (m if convention == "report" else 1)
        fired = jnp.zeros((m,), bool).at[idx.reshape(-1)].max(active.reshape(-1))
        aux = sae.LossAux(jnp.mean(sq_B) / t_BxD.shape[-1], l1,
                          jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)), fired, sq_B)
        atoms_BxKxD = jax.lax.stop_gradient(sparse_unit.unit_rows(params.D_MxD))[idx]
        resid = r_BxD - jnp.einsum("bk,bkd->bd", jax.lax.stop_gradient(vals), atoms_BxKxD)  # AuxK's
        return aux.mse, (aux, jnp.zeros((), jnp.float32)), resid

    def saelens_config(self, arch: CellArch) -> dict:
        """k, and rescale_acts_by_decoder_norm (a no-op on unit rows; SAELens saves its own TopK
        SAEs so)."""
        return {"k": arch.k, "rescale_acts_by_decoder_norm": True}

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """AutoEncoderTopK, with its threshold buffer at -1 (none)."""
        return topk_state_dict(w, arch, np.float32(-1.0))


def topk_state_dict(w: dict[str, np.ndarray], arch: CellArch, theta: np.floating) -> dict[str, np.ndarray]:
    """dictionary_learning's TopK-family state dict (AutoEncoderTopK, BatchTopKSAE): encoder.*,
    decoder.weight (d, m), b_dec, and k and threshold as 0-d buffers."""
    return {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"],
            "decoder.weight": np.ascontiguousarray(w["D_unit"].T), "b_dec": decoder_bias(w),
            "k": np.array(arch.k, np.int32), "threshold": np.array(theta, np.float32)}


TOPK = TopK(
    name="topk", sparsity_key="k", sparsity_name="k", sparsity_label="k (active latents)",
    title="topk: ", uses_k=True, default_aux_k_coeff=1 / 32, sparse_decoder=True,
    saelens_arch="topk", dl_class="AutoEncoderTopK")
