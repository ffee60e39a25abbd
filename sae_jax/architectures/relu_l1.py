"""relu_l1, the report's SAE: c = ReLU(p), L = (1/d)||t - x^||^2 + alpha * L1(c).

Its loss is exactly `sae.loss`, and the fused step (`fused.group_loss_and_grad`) computes it for
a whole group. It never takes AuxK: a dead ReLU latent has ReLU(p) = 0 on every input, so AuxK
could not move it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.architectures.base import Architecture, ArchOptions, CellArch, LossOut, decoder_bias, folded_encoder_bias


@dataclasses.dataclass(frozen=True)
class ReluL1(Architecture):
    def encode(self, params: sae.SAEParams, x_BxD: jax.Array, arch: CellArch) -> jax.Array:
        return sae.encode(params, x_BxD)

    def loss(self, params: sae.SAEParams, x_BxD: jax.Array, coeff: jax.Array, arch: CellArch,
             convention: str, target_BxD: jax.Array | None, opts: ArchOptions,
             dead_M: jax.Array | None) -> LossOut:
        total, aux = sae.loss(params, x_BxD, coeff, convention, target_BxD)
        return total, (aux, jnp.zeros((), jnp.float32))

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """AutoEncoderNew, which does not subtract b_dec before its encoder: b_dec folded into
        the encoder bias."""
        return {"encoder.weight": w["W_enc"], "encoder.bias": folded_encoder_bias(w),
                "decoder.weight": np.ascontiguousarray(w["D_unit"].T), "decoder.bias": decoder_bias(w)}


RELU_L1 = ReluL1(
    name="relu_l1", sparsity_key="l1", sparsity_name="alpha", sparsity_label="alpha (L1 coefficient)",
    title="", coeff="l1", penalty_per_latent=True, fused_step=True,
    saelens_arch="standard", dl_class="AutoEncoderNew", dl_sparsity_field="l1_penalty")
