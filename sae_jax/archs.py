"""The SAE architectures a grid can hold, as pure functions of one cell.

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

L1 and L0 follow the grid's convention: divided by m ("report") or not ("sum"). JumpReLU's
Heaviside H gets the straight-through pseudo-derivatives of a rectangle kernel of width eps:
d/dtheta H(p - theta) = -(1/eps) K((p - theta)/eps) and d/dtheta [p H(p - theta)] =
-(theta/eps) K((p - theta)/eps), with K(u) = [|u| < 1/2]; H passes no gradient to p.

AuxK (Gao et al.), for topk, batchtopk and jumprelu: with e = t - x^ (no gradient) and the dead
latents' codes ReLU(p) restricted to their k_aux largest, e^ = decode(those codes),
    L_aux = coeff * mean_b ||e - e^||^2 / mean_b ||e - mean(e)||^2      (0 when none is dead).
TopK and BatchTopK take it by default (coeff 1/32, Gao et al.'s) where resampling is off
(`TrainConfig.arch_options`): their codes pass gradient only to the selected latents, so a
latent that drops out of every sample's top k early in training never moves again, and on small
worlds a quarter of the dictionary died that way (README: "Dead latents"). JumpReLU keeps it off
unless asked. (A dead relu_l1 latent has ReLU(p) = 0 on
every input, so AuxK could not move it; relu_l1 cells keep the report's loss.)

The static part of an architecture (its name and k) is an `Arch`; per-cell numbers (alpha or
lambda) are traced, so cells of one (arch, size, k) group train in one vmapped step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax import sae

Array = jax.Array
ARCHS = ("relu_l1", "topk", "batchtopk", "jumprelu")
TOPK_ARCHS = ("topk", "batchtopk")
# What each architecture's sparsity setting is called (results.json keys, axis labels).
SPARSITY_KEY = {"relu_l1": "l1", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coeff"}
SPARSITY_NAME = {"relu_l1": "alpha", "topk": "k", "batchtopk": "k", "jumprelu": "lambda"}
SPARSITY_LABEL = {"relu_l1": "alpha (L1 coefficient)", "topk": "k (active latents)",
                  "batchtopk": "k (mean active latents)", "jumprelu": "lambda (L0 coefficient)"}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The static part of a cell's architecture: its name and, for topk/batchtopk, k."""

    name: str = "relu_l1"
    k: int = 0

    @property
    def uses_k(self) -> bool:
        return self.name in TOPK_ARCHS

    @property
    def has_threshold(self) -> bool:
        return self.name in ("batchtopk", "jumprelu")


RELU_L1 = Arch()


class ArchOptions(NamedTuple):
    """Static training options of the architectures (from `TrainConfig`)."""

    bandwidth: float = 0.05  # JumpReLU's kernel width eps
    aux_k_coeff: float | None = None  # AuxK's coefficient (0: off; None: `aux_k_coeff`'s default)
    aux_k: int = 0  # AuxK's k_aux (0: d / 2)
    sparse: str = "auto"  # topk and batchtopk without AuxK: the sparse decoder (sae_jax.sparse):
    #                       "on", "off", or "auto" (`uses_sparse`)
    compute_dtype: str = "float32"  # the sparse path's encoder GEMM operands and kernel rows


DEFAULT_AUX_K_COEFF = {"topk": 1 / 32, "batchtopk": 1 / 32}  # Gao et al.'s; others: 0


def aux_k_coeff(arch: Arch, opts: ArchOptions) -> float:
    """The cell's AuxK coefficient: the one given, else its architecture's default
    (`DEFAULT_AUX_K_COEFF`: 1/32 for topk and batchtopk, 0 (off) for the others)."""
    if opts.aux_k_coeff is not None:
        return opts.aux_k_coeff
    return DEFAULT_AUX_K_COEFF.get(arch.name, 0.0)


def pre_acts(params: sae.SAEParams, x_BxD: Array) -> Array:
    """p = W_e (x - b_dec) + b_e, computed as W_e x + (b_e - W_e b_dec) (`folded_bias`)."""
    return x_BxD @ params.W_enc_MxD.T + folded_bias(params)


def folded_bias(params: sae.SAEParams) -> Array:
    """b_e - W_e b_dec: the encoder bias with the decoder bias folded in, so that
    W_e (x - b_dec) + b_e = W_e x + folded_bias and a batch x shared by a group's cells stays
    shared (one GEMM for the group)."""
    if params.b_dec_D is None:
        return params.b_enc_M
    return params.b_enc_M - params.W_enc_MxD @ params.b_dec_D


def _residual_target(params: sae.SAEParams, t_BxD: Array) -> Array:
    """t - b_dec: what the codes' decoding D^ c must reconstruct."""
    return sae.centred(params, t_BxD)


def topk_mask(pre_BxM: Array, k: int) -> Array:
    """True on each row's k largest entries."""
    from sae_jax import sparse

    return pre_BxM >= sparse.kth_largest(pre_BxM, k)[..., None]


def batch_topk_mask(pre_BxM: Array, k: int) -> tuple[Array, Array]:
    """(True on the batch's k*B largest entries, the smallest kept entry)."""
    from sae_jax import sparse

    n = min(k * pre_BxM.shape[0], pre_BxM.size)
    kth = sparse.kth_largest(pre_BxM.reshape(1, -1), n)[0]
    return pre_BxM >= kth, kth


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump(pre: Array, theta: Array, eps: float) -> Array:
    """p * H(p - theta)."""
    return pre * (pre > theta)


def _jump_fwd(pre, theta, eps):
    return _jump(pre, theta, eps), (pre, theta)


def _jump_bwd(eps, res, g):
    pre, theta = res
    near = (jnp.abs(pre - theta) < eps / 2).astype(g.dtype)
    return g * (pre > theta), _to_theta(-g * near * theta / eps, theta)


_jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _step(pre: Array, theta: Array, eps: float) -> Array:
    """H(p - theta)."""
    return (pre > theta).astype(pre.dtype)


def _step_fwd(pre, theta, eps):
    return _step(pre, theta, eps), (pre, theta)


def _step_bwd(eps, res, g):
    pre, theta = res
    near = (jnp.abs(pre - theta) < eps / 2).astype(g.dtype)
    return jnp.zeros_like(pre), _to_theta(-g * near / eps, theta)


def _to_theta(g_BxM: Array, theta: Array) -> Array:
    """A (..., m) cotangent summed down to theta's shape."""
    return jnp.sum(g_BxM, axis=tuple(range(g_BxM.ndim - theta.ndim)))


_step.defvjp(_step_fwd, _step_bwd)


def threshold(params: sae.SAEParams) -> Array:
    """theta = exp(log_theta) (per latent)."""
    return jnp.exp(params.log_threshold_M)


def encode(params: sae.SAEParams, x_BxD: Array, arch: Arch = RELU_L1) -> Array:
    """Inference codes (B, m) of any architecture (batchtopk: the thresholded form)."""
    if arch.name == "relu_l1":
        return sae.encode(params, x_BxD)
    pre = pre_acts(params, x_BxD)
    if arch.name == "topk":
        return jnp.where(topk_mask(pre, min(arch.k, pre.shape[-1])), jax.nn.relu(pre), 0.0)
    if arch.name in ("batchtopk", "jumprelu"):
        return jnp.where(pre > threshold(params), pre, 0.0)
    raise ValueError(f"unknown architecture {arch.name!r}; expected one of {ARCHS}")


def _sum_over_latents(a_BxM: Array, convention: str) -> Array:
    per_sample = jnp.sum(a_BxM, axis=-1)
    return jnp.mean(per_sample / a_BxM.shape[-1] if convention == "report" else per_sample)


def train_codes(params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: Arch, convention: str,
                eps: float) -> tuple[Array, Array, Array, Array]:
    """(codes (B, m) as trained, pre-activations, the sparsity term S, the batch statistic that
    batchtopk's threshold tracks (its smallest kept activation; 0 otherwise))."""
    pre = pre_acts(params, x_BxD)
    zero = jnp.zeros((), jnp.float32)
    if arch.name == "topk":
        return jnp.where(topk_mask(pre, min(arch.k, pre.shape[-1])), jax.nn.relu(pre), 0.0), pre, zero, zero
    if arch.name == "batchtopk":
        mask, kth = batch_topk_mask(pre, arch.k)
        return jnp.where(mask, jax.nn.relu(pre), 0.0), pre, zero, jax.lax.stop_gradient(jnp.maximum(kth, 0.0))
    if arch.name == "jumprelu":
        theta = threshold(params)
        c = _jump(pre, theta, eps)
        return c, pre, coeff * _sum_over_latents(_step(pre, theta, eps), convention), zero
    raise ValueError(f"train_codes is for topk, batchtopk and jumprelu, got {arch.name!r}")


def aux_k_loss(params: sae.SAEParams, pre_BxM: Array, resid_BxD: Array, dead_M: Array,
               k_aux: int) -> Array:
    """||e - e^||^2 / ||e - mean e||^2 (batch means) with e^ decoded from the dead latents' k_aux
    largest ReLU pre-activations per sample; 0 when no latent is dead."""
    e = jax.lax.stop_gradient(resid_BxD)
    dead_pre = jnp.where(dead_M, jax.nn.relu(pre_BxM), 0.0)
    k_aux = min(k_aux, pre_BxM.shape[-1])
    codes = jnp.where(topk_mask(dead_pre, k_aux) & dead_M, dead_pre, 0.0)
    e_hat = codes @ sae.unit_rows(params.D_MxD)  # the residual's reconstruction: no decoder bias
    var = jnp.mean(jnp.sum(jnp.square(e - jnp.mean(e, axis=0)), axis=-1))
    loss = jnp.mean(jnp.sum(jnp.square(e - e_hat), axis=-1)) / jnp.maximum(var, 1e-12)
    return jnp.where(jnp.any(dead_M), loss, 0.0)


SPARSE_MODES = ("auto", "on", "off")
SPARSE_AUTO_RATIO = 64  # "auto" with XLA's CPU kernels: sparse where k <= m / 64


def uses_sparse(arch: Arch, m: int, opts: ArchOptions) -> bool:
    """Whether a topk or batchtopk cell of m latents trains through the sparse decoder (never
    with AuxK, whose dead-latent codes need every pre-activation: so only with an AuxK
    coefficient of 0, `aux_k_coeff`). "auto", measured with
    benchmarks/grid_step.py: on the CPU always with the native kernels (TopK: 1.6x the dense
    TopK step's speed at k = m/8, 2.2x at m/16), else TopK where k <= m / 64; never on other
    backends (on an H200 the sparse step through XLA's gathers ran 4-10x slower than the dense
    one)."""
    if arch.name not in TOPK_ARCHS or aux_k_coeff(arch, opts) or opts.sparse == "off":
        return False
    if opts.sparse == "on":
        return True
    if jax.default_backend() != "cpu":
        return False
    from sae_jax import sparse

    return sparse.native_in_use() or (arch.name == "topk" and arch.k * SPARSE_AUTO_RATIO <= m)


def _topk_sparse_loss(params: sae.SAEParams, x_BxD: Array, t_BxD: Array, k: int, convention: str,
                      compute_dtype: str) -> tuple[Array, tuple[sae.LossAux, Array]]:
    """TopK's loss through the sparse decoder: k of m atoms gathered per sample, gradients by
    scatter-adds (`sae_jax.sparse`); the same values as the dense formulation."""
    from sae_jax import sparse, sparse_unit

    m = params.W_enc_MxD.shape[0]
    vals, idx = sparse.topk_codes(params.W_enc_MxD, folded_bias(params), x_BxD, min(k, m), compute_dtype)
    sq_B = sparse_unit.decode_sq_err_unit(params.D_MxD, vals, idx, _residual_target(params, t_BxD),
                                          compute_dtype)
    active = vals > 0
    l1 = jnp.mean(jnp.sum(vals, axis=-1)) / (m if convention == "report" else 1)
    fired = jnp.zeros((m,), bool).at[idx.reshape(-1)].max(active.reshape(-1))
    aux = sae.LossAux(jnp.mean(sq_B) / t_BxD.shape[-1], l1,
                      jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)), fired, sq_B)
    return aux.mse, (aux, jnp.zeros((), jnp.float32))


def _batchtopk_sparse_loss(params: sae.SAEParams, x_BxD: Array, t_BxD: Array, k: int,
                           convention: str, compute_dtype: str) -> tuple[Array, tuple[sae.LossAux, Array]]:
    """BatchTopK's loss through the sparse decoder (`sae_jax.sparse_coo`'s row layout): the same
    values as the dense formulation, and the same batch statistic (max(N-th largest p, 0))."""
    from sae_jax import sparse_coo, sparse_unit

    m, batch = params.W_enc_MxD.shape[0], x_BxD.shape[0]
    c = sparse_coo.batchtopk_rows(params.W_enc_MxD, folded_bias(params), x_BxD, min(k, m), compute_dtype)
    t_BxD = _residual_target(params, t_BxD)
    x_hat = sparse_coo.decode_rows(sparse_unit.unit_rows(params.D_MxD), c.vals_RxJ, c.latent_RxJ,
                                   c.sample_R, batch, compute_dtype)
    active = c.vals_RxJ > 0
    fired = jnp.zeros((m,), bool).at[c.latent_RxJ.reshape(-1)].max(active.reshape(-1))
    l1 = jnp.sum(c.vals_RxJ) / batch / (m if convention == "report" else 1)
    sq_B = jnp.sum(jnp.square(t_BxD - x_hat), axis=-1)
    aux = sae.LossAux(jnp.mean(sq_B) / t_BxD.shape[-1], l1,
                      jnp.sum(active).astype(jnp.float32) / batch, fired, sq_B)
    return aux.mse, (aux, jnp.maximum(c.threshold, 0.0))


def _aux(t_BxD: Array, x_hat_BxD: Array, l1: Array, active: Array, fired_M: Array) -> sae.LossAux:
    """`sae.LossAux` from the reconstruction, the L1 term and the active codes (any layout whose
    last axis runs over one sample's codes)."""
    sq = jnp.square(t_BxD - x_hat_BxD)
    return sae.LossAux(jnp.mean(sq), l1, jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)),
                       fired_M, jnp.sum(sq, axis=-1))


def loss(params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: Arch, convention: str = "report",
         target_BxD: Array | None = None, opts: ArchOptions = ArchOptions(),
         dead_M: Array | None = None) -> tuple[Array, tuple[sae.LossAux, Array]]:
    """L = (1/d)||t - x^||^2 + S (+ L_aux) for one cell of any architecture; aux as `sae.loss`'s,
    plus batchtopk's smallest kept activation. relu_l1 is exactly `sae.loss`."""
    t = x_BxD if target_BxD is None else target_BxD
    if arch.name == "relu_l1":
        total, aux = sae.loss(params, x_BxD, coeff, convention, target_BxD)
        return total, (aux, jnp.zeros((), jnp.float32))
    if uses_sparse(arch, params.W_enc_MxD.shape[0], opts):
        sparse_loss = _topk_sparse_loss if arch.name == "topk" else _batchtopk_sparse_loss
        return sparse_loss(params, x_BxD, t, arch.k, convention, opts.compute_dtype)
    c, pre, sparsity, kth = train_codes(params, x_BxD, coeff, arch, convention, opts.bandwidth)
    x_hat = sae.decode(params, c)
    active = c > 0
    aux = _aux(t, x_hat, sae.l1_penalty(c, convention), active, jnp.any(active, axis=0))
    total = aux.mse + sparsity
    aux_coeff = aux_k_coeff(arch, opts)
    if aux_coeff and dead_M is not None:
        k_aux = opts.aux_k or max(1, x_BxD.shape[-1] // 2)
        total = total + aux_coeff * aux_k_loss(params, pre, t - x_hat, dead_M, k_aux)
    return total, (aux, kth)
