"""The report's toy data: sparse, correlated, frequency-decayed combinations of h features in d dims.

Generator (Sharkey, Braun & Millidge 2022, "Toy dataset generation"):

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

Knobs past the report (defaults reproduce the report's world bit for bit; see `ToyConfig`):
correlation strength s, Zipfian base rates, hierarchy, non-negative features, per-sample
direction jitter and additive Gaussian noise. One of `WORLD_AXES` can be swept as an axis of a
grid (`axis_worlds`, `sample_inputs`).
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
    """Toy-world parameters; the defaults are the report's.

    - corr_strength s in [0, 1]: C(s) = (1 - s) I + s C_random (s = 1: the report's random
      correlation; s = 0: every z_i independent, so features fire independently);
    - zipf a > 0: base rates p_i ∝ (i + 1)^-a (Zipf) instead of lambda^i (`decay` is then unused);
    - hierarchy c > 0: features form families of 1 + c, i = (c+1) q is the parent of
      (c+1) q + 1 .. (c+1) q + c; a child is active only when its parent is, with conditional
      rate min(1, p_child / p_parent), so its marginal rate is min(p_child, p_parent);
    - nonneg: g_i = |n_i| / ||n_i||, n_i ~ N(0, I_d) (every feature in the positive orthant);
    - jitter sigma (radians): per sample and feature, g'_i = cos(theta) g_i + sin(theta) u with
      theta ~ N(0, sigma^2) and u a uniform unit vector orthogonal to g_i, so angle(g'_i, g_i) = |theta|;
    - noise sigma_n: the input is x + sigma_n eps, eps ~ N(0, I_d); the target is the clean x,
      or the same noisy x with `noise_targets` (see `sample_with_target`).
    """

    d: int = 256
    features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    correlated: bool = True
    fresh_z: bool = True
    corr_strength: float = 1.0
    zipf: float = 0.0
    hierarchy: int = 0
    nonneg: bool = False
    jitter: float = 0.0
    noise: float = 0.0
    noise_targets: bool = False

    def validate(self) -> "ToyConfig":
        for name in ("d", "features", "mean_active", "decay", "corr_strength", "zipf", "jitter", "noise"):
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
        if not (0 <= self.corr_strength <= 1):
            raise UsageError(f"`corr_strength` must be in [0, 1], got {self.corr_strength}",
                             field="corr_strength")
        if self.zipf < 0:
            raise UsageError(f"`zipf` must be >= 0, got {self.zipf}", field="zipf")
        if not (isinstance(self.hierarchy, int) and 0 <= self.hierarchy < self.features):
            raise UsageError(f"`hierarchy` must be an integer in [0, features), got {self.hierarchy}",
                             field="hierarchy")
        if self.jitter < 0:
            raise UsageError(f"`jitter` must be >= 0, got {self.jitter}", field="jitter")
        if self.noise < 0:
            raise UsageError(f"`noise` must be >= 0, got {self.noise}", field="noise")
        return self


@struct.dataclass
class ToyWorld:
    """A sampled world: features_HxD (unit rows), the copula factor and the base probabilities.

    k/h, the jitter and the noise std are leaves, not static fields (only whether there is
    jitter or noise is static), so worlds of one shape that differ in them share one compiled
    training program."""

    features_HxD: Array
    chol_HxH: Array  # lower Cholesky factor of the correlation matrix C
    decay_H: Array  # lambda^i, or (i + 1)^-a for Zipfian rates
    probs_H: Array  # p_i for a fixed z (used when fresh_z is False)
    active_share: Array  # k / h (float32), k the mean number of active features
    correlated: bool = struct.field(pytree_node=False)
    fresh_z: bool = struct.field(pytree_node=False)
    hierarchy: int = struct.field(pytree_node=False, default=0)
    jitter: Array | float = 0.0
    noise: Array | float = 0.0
    noise_targets: bool = struct.field(pytree_node=False, default=False)
    jittered: bool = struct.field(pytree_node=False, default=False)  # jitter > 0
    noisy: bool = struct.field(pytree_node=False, default=False)  # noise > 0

    @property
    def d(self) -> int:
        return self.features_HxD.shape[1]

    @property
    def h(self) -> int:
        return self.features_HxD.shape[0]


def _rescale(p_H: Array, active_share: Array) -> Array:
    """p <- p * (k/h) / mean(p), clipped to [0, 1]."""
    return jnp.clip(p_H * active_share / jnp.mean(p_H, axis=-1, keepdims=True), 0.0, 1.0)


def _probs_from_z(world: ToyWorld, z_H: Array) -> Array:
    p_tilde = jax.scipy.stats.norm.cdf(z_H) if world.correlated else jnp.full_like(z_H, 0.5)
    return _rescale(world.decay_H * p_tilde, world.active_share)


def random_correlation(key: Array, h: int) -> Array:
    """A random correlation matrix C = S^-1/2 A A^T S^-1/2 with A_ij ~ N(0, 1), S = diag(A A^T)."""
    a = jax.random.normal(key, (h, h))
    cov = a @ a.T / h
    s = jnp.sqrt(jnp.diag(cov))
    return cov / s[:, None] / s[None, :]


def parents(h: int, hierarchy: int) -> Array:
    """Parent index of every feature: (c + 1) * floor(i / (c + 1)); a parent is its own."""
    i = jnp.arange(h)
    return i - i % (hierarchy + 1)


def make_world(key: Array, cfg: ToyConfig = ToyConfig()) -> ToyWorld:
    """Draws the ground-truth features, the correlation factor and (fixed-z) probabilities."""
    cfg.validate()
    k_feat, k_cov, k_z = jax.random.split(key, 3)
    g = jax.random.normal(k_feat, (cfg.features, cfg.d))
    if cfg.nonneg:
        g = jnp.abs(g)
    g = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    corr = random_correlation(k_cov, cfg.features)
    if cfg.corr_strength != 1.0:
        corr = (1.0 - cfg.corr_strength) * jnp.eye(cfg.features) + cfg.corr_strength * corr
    chol = jnp.linalg.cholesky(corr + 1e-4 * jnp.eye(cfg.features))
    i_H = jnp.arange(cfg.features, dtype=jnp.float32)
    if cfg.zipf > 0:
        decay = (i_H + 1.0) ** -jnp.asarray(cfg.zipf, jnp.float32)
    else:
        decay = jnp.asarray(cfg.decay, jnp.float32) ** i_H
    world = ToyWorld(g, chol, decay, jnp.zeros(cfg.features),
                     jnp.float32(float(cfg.mean_active) / cfg.features),
                     bool(cfg.correlated), bool(cfg.fresh_z), int(cfg.hierarchy),
                     jnp.float32(cfg.jitter), jnp.float32(cfg.noise), bool(cfg.noise_targets),
                     cfg.jitter > 0, cfg.noise > 0)
    z = chol @ jax.random.normal(k_z, (cfg.features,))
    return world.replace(probs_H=_probs_from_z(world, z))


def jitter_directions(key: Array, features_HxD: Array, sigma: float, n: int) -> Array:
    """(n, h, d) unit vectors g'_i = cos(theta) g_i + sin(theta) u, theta ~ N(0, sigma^2), u a
    uniform unit vector orthogonal to g_i (g_i unit rows)."""
    k_t, k_u = jax.random.split(key)
    h, d = features_HxD.shape
    theta = sigma * jax.random.normal(k_t, (n, h, 1))
    u = jax.random.normal(k_u, (n, h, d))
    u = u - jnp.sum(u * features_HxD, axis=-1, keepdims=True) * features_HxD
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    return jnp.cos(theta) * features_HxD + jnp.sin(theta) * u


def sample_with_target(key: Array, world: ToyWorld, n: int) -> tuple[Array, Array, Array]:
    """Draws n samples: (input_NxD, target_NxD, coeffs_NxH). Without jitter and noise both are
    x = coeffs @ features; with jitter x_n = sum_i c_ni g'_ni; the input adds sigma_n eps and the
    target is x (or the noisy input with noise_targets)."""
    k_z, k_on, k_c = jax.random.split(key, 3)
    if world.fresh_z:
        p_H = _probs_from_z(world, world.chol_HxH @ jax.random.normal(k_z, (world.h,)))
    else:
        p_H = world.probs_H
    if world.hierarchy:
        par_H = parents(world.h, world.hierarchy)
        is_child = par_H != jnp.arange(world.h)
        p_H = jnp.where(is_child, jnp.minimum(1.0, p_H / jnp.maximum(p_H[par_H], 1e-30)), p_H)
    active = jax.random.uniform(k_on, (n, world.h)) < p_H
    if world.hierarchy:
        active = active & active[:, par_H]
    coeffs = jnp.where(active, jax.random.uniform(k_c, (n, world.h)), 0.0)
    if world.jittered:
        dirs = jitter_directions(jax.random.fold_in(key, 0x717), world.features_HxD, world.jitter, n)
        x = jnp.einsum("nh,nhd->nd", coeffs, dirs)
    else:
        x = coeffs @ world.features_HxD
    if not world.noisy:
        return x, x, coeffs
    noisy = x + world.noise * jax.random.normal(jax.random.fold_in(key, 0x9015E), x.shape)
    return noisy, (noisy if world.noise_targets else x), coeffs


def sample(key: Array, world: ToyWorld, n: int) -> tuple[Array, Array]:
    """Draws n samples: returns (x_NxD, coeffs_NxH), x the (noisy, jittered) input; without
    knobs x = coeffs @ features."""
    x, _, coeffs = sample_with_target(key, world, n)
    return x, coeffs


# ----------------------------------------------------------------------------- a world axis
WORLD_AXES = ("noise", "jitter", "corr_strength")


def check_world_axis(axis: str, values: tuple[float, ...], denoising: bool = False) -> None:
    """A world axis names one of `WORLD_AXES` and >= 1 distinct finite values (none without an
    axis), and is not combined with the denoising grid's per-cell input noise."""
    if not axis and not values:
        return
    if axis not in WORLD_AXES:
        raise UsageError(f"`world_axis` must be one of {', '.join(WORLD_AXES)}, got {axis!r}",
                         field="world_axis")
    if not values:
        raise UsageError(f"`world_values` needs at least one value of {axis}", field="world_values")
    if not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise UsageError(f"`world_values` must be distinct finite numbers, got {list(values)}",
                         field="world_values")
    if denoising:
        raise UsageError("`world_axis` cannot be combined with denoising noise", field="world_axis")


def axis_worlds(key: Array, cfg: ToyConfig, axis: str, values: tuple[float, ...]) -> tuple[ToyWorld, ...]:
    """One world per value v of the knob `axis` (cfg with axis = v), all made from the same key:
    the same features g_i, and for corr_strength the Cholesky factor of C(v) = (1 - v) I + v C
    with the same random C. Value v's world is exactly the one `make_world(key, cfg)` makes with
    that value set."""
    check_world_axis(axis, values)
    if axis == "corr_strength" and not cfg.correlated:
        raise UsageError("`world_axis` corr_strength needs a correlated world", field="world_axis")
    worlds = []
    for v in values:
        try:
            worlds.append(make_world(key, dataclasses.replace(cfg, **{axis: float(v)})))
        except UsageError as e:
            raise UsageError(f"`world_values`: {str(e).replace('`', '')}", field="world_values") from None
    return tuple(worlds)


def sample_inputs(key: Array, world: ToyWorld | tuple[ToyWorld, ...], n: int) -> Array:
    """The inputs x of `sample(key, world, n)`: (n, d); for a world axis's worlds (V, n, d), value
    v's batch being `sample(key, worlds[v], n)`: every value from the same random numbers (the
    same active features and coefficients; the noise x + v eps, the jitter angles v theta and
    the copula z = chol(C(v)) e share eps, theta and e). With noise the input is also the target."""
    if not isinstance(world, tuple):
        return sample(key, world, n)[0]
    return jnp.stack([sample(key, w, n)[0] for w in world])
