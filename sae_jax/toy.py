"""The report's toy data: sparse, correlated, frequency-decayed combinations of h features in d dims.

Generator (Sharkey, Braun & Millidge 2022, numbers restored in NUMBERS.md):

- ground-truth features g_i, i = 0..h-1, uniform on the unit sphere in R^d;
- correlation (Gaussian copula): a random correlation matrix C, z ~ N(0, C), p~_i = Phi(z_i);
- frequency decay: p_i = lambda^i * p~_i;
- rescaling: p <- p * (k/h) / mean(p), so that on average k of the h features are active;
- feature i is active when u_i < p_i, u ~ U(0, 1); its coefficient is c_i ~ U(0, 1);
- x = sum_i c_i g_i.

Without correlation p~_i = 1/2. The report draws one z per world (``fresh_z=False``); the
replication draws a fresh z per batch (``fresh_z=True``, our default). With one fixed z about 1%
of the features get p~_i < 0.01 and are almost never active, which caps the attainable MMCS
near 0.97; a fresh z per batch gives every feature its decayed base rate on average.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from sae_jax.errors import UsageError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Toy-world parameters; the defaults are the report's."""

    d: int = 256
    features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    correlated: bool = True
    fresh_z: bool = True

    def validate(self) -> "ToyConfig":
        for name in ("d", "features", "mean_active", "decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise UsageError(f"`{name}` must be a finite number, got {v}", field=name)
        if int(self.d) <= 0:
            raise UsageError(f"`d` must be a positive integer, got {self.d}", field="d")
        if int(self.features) <= 0:
            raise UsageError(f"`features` must be a positive integer, got {self.features}", field="features")
        k = float(self.mean_active)
        if not (k > 0 and k <= self.features):
            raise UsageError(
                f"`mean_active` must be in (0, features={self.features}], got {self.mean_active}",
                field="mean_active")
        lam = float(self.decay)
        if not (0 < lam <= 1):
            raise UsageError(f"`decay` must be in (0, 1], got {self.decay}", field="decay")
        return self


@struct.dataclass
class ToyWorld:
    """A sampled world: features_HxD (unit rows), the copula factor and the base probabilities."""

    features_HxD: Array
    chol_HxH: Array  # lower Cholesky factor of the correlation matrix C
    decay_H: Array  # lambda^i
    probs_H: Array  # p_i for a fixed z (used when fresh_z is False)
    mean_active: float = struct.field(pytree_node=False)
    correlated: bool = struct.field(pytree_node=False)
    fresh_z: bool = struct.field(pytree_node=False)

    @property
    def d(self) -> int:
        return self.features_HxD.shape[1]

    @property
    def h(self) -> int:
        return self.features_HxD.shape[0]


def _rescale(p_H: Array, mean_active: float) -> Array:
    """p <- p * (k/h) / mean(p), clipped to [0, 1]."""
    h = p_H.shape[-1]
    return jnp.clip(p_H * (mean_active / h) / jnp.mean(p_H, axis=-1, keepdims=True), 0.0, 1.0)


def _probs_from_z(world: ToyWorld, z_H: Array) -> Array:
    p_tilde = jax.scipy.stats.norm.cdf(z_H) if world.correlated else jnp.full_like(z_H, 0.5)
    return _rescale(world.decay_H * p_tilde, world.mean_active)


def random_correlation(key: Array, h: int) -> Array:
    """A random correlation matrix C = S^-1/2 A A^T S^-1/2 with A_ij ~ N(0, 1), S = diag(A A^T)."""
    a = jax.random.normal(key, (h, h))
    cov = a @ a.T / h
    s = jnp.sqrt(jnp.diag(cov))
    return cov / s[:, None] / s[None, :]


def make_world(key: Array, cfg: ToyConfig = ToyConfig()) -> ToyWorld:
    """Draws the ground-truth features, the correlation factor and (fixed-z) probabilities."""
    cfg.validate()
    k_feat, k_cov, k_z = jax.random.split(key, 3)
    g = jax.random.normal(k_feat, (cfg.features, cfg.d))
    g = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    corr = random_correlation(k_cov, cfg.features)
    chol = jnp.linalg.cholesky(corr + 1e-4 * jnp.eye(cfg.features))
    decay = jnp.asarray(cfg.decay, jnp.float32) ** jnp.arange(cfg.features, dtype=jnp.float32)
    world = ToyWorld(g, chol, decay, jnp.zeros(cfg.features), float(cfg.mean_active),
                     bool(cfg.correlated), bool(cfg.fresh_z))
    z = chol @ jax.random.normal(k_z, (cfg.features,))
    return world.replace(probs_H=_probs_from_z(world, z))


def sample(key: Array, world: ToyWorld, n: int) -> tuple[Array, Array]:
    """Draws n samples: returns (x_NxD, coeffs_NxH) with x = coeffs @ features."""
    k_z, k_on, k_c = jax.random.split(key, 3)
    if world.fresh_z:
        p_H = _probs_from_z(world, world.chol_HxH @ jax.random.normal(k_z, (world.h,)))
    else:
        p_H = world.probs_H
    active = jax.random.uniform(k_on, (n, world.h)) < p_H
    coeffs = jnp.where(active, jax.random.uniform(k_c, (n, world.h)), 0.0)
    return coeffs @ world.features_HxD, coeffs
