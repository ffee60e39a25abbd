"""jumprelu (Rajamanoharan et al. 2024): c = p * H(p - theta_j), theta = exp(log_theta) learned
per latent, S = lambda * L0(c) (divided by m under the report's convention).

The Heaviside H gets the straight-through pseudo-derivatives of a rectangle kernel of width eps:
d/dtheta H(p - theta) = -(1/eps) K((p - theta)/eps) and d/dtheta [p H(p - theta)] =
-(theta/eps) K((p - theta)/eps), with K(u) = [|u| < 1/2]; H passes no gradient to p. A latent
the resampler recycles starts at the live latents' mean log threshold.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.architectures.base import (
    Architecture,
    CellArch,
    ThresholdEncode,
    decoder_bias,
    folded_encoder_bias,
    pre_acts,
    sum_over_latents,
    threshold,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(pre: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """p * H(p - theta)."""
    return pre * (pre > theta)


def _jump_fwd(pre, theta, eps):
    return jump(pre, theta, eps), (pre, theta)


def _jump_bwd(eps, res, g):
    pre, theta = res
    near = (jnp.abs(pre - theta) < eps / 2).astype(g.dtype)
    return g * (pre > theta), _to_theta(-g * near * theta / eps, theta)


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """H(p - theta)."""
    return (pre > theta).astype(pre.dtype)


def _step_fwd(pre, theta, eps):
    return step(pre, theta, eps), (pre, theta)


def _step_bwd(eps, res, g):
    pre, theta = res
    near = (jnp.abs(pre - theta) < eps / 2).astype(g.dtype)
    return jnp.zeros_like(pre), _to_theta(-g * near / eps, theta)


def _to_theta(g_BxM: jax.Array, theta: jax.Array) -> jax.Array:
    """A (..., m) cotangent summed down to theta's shape."""
    return jnp.sum(g_BxM, axis=tuple(range(g_BxM.ndim - theta.ndim)))


step.defvjp(_step_fwd, _step_bwd)


@dataclasses.dataclass(frozen=True)
class JumpReLU(ThresholdEncode, Architecture):
    def train_codes(self, params: sae.SAEParams, x_BxD: jax.Array, coeff: jax.Array, arch: CellArch,
                    convention: str, eps: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        pre = pre_acts(params, x_BxD)
        theta = threshold(params)
        c = jump(pre, theta, eps)
        return c, pre, coeff * sum_over_latents(step(pre, theta, eps), convention), jnp.zeros((), jnp.float32)

    def recycle(self, params: sae.SAEParams, old: sae.SAEParams, mask_M: jax.Array,
                live_M: jax.Array) -> sae.SAEParams:
        """A recycled latent's log threshold: the live latents' mean (all latents' with none live)."""
        t = old.log_threshold_M
        any_live, n_live = jnp.any(live_M), jnp.maximum(jnp.sum(live_M), 1)
        mean_t = jnp.where(any_live, jnp.sum(t * live_M) / n_live, jnp.mean(t))
        return params._replace(log_threshold_M=jnp.where(mask_M, mean_t, t))

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """JumpReluAutoEncoder (its default apply_b_dec_to_input False: b_dec folded into b_enc)."""
        return {"W_enc": np.ascontiguousarray(w["W_enc"].T), "b_enc": folded_encoder_bias(w), "W_dec": w["D_unit"],
                "b_dec": decoder_bias(w), "threshold": w["threshold"]}


JUMPRELU = JumpReLU(
    name="jumprelu", sparsity_key="l0_coeff", sparsity_name="lambda", sparsity_label="lambda (L0 coefficient)",
    title="jumprelu: ", coeff="l0", has_threshold=True, penalty_per_latent=True,
    saelens_arch="jumprelu", dl_class="JumpReluAutoEncoder", dl_sparsity_field="sparsity_penalty")
