"""The report's sparse autoencoder as pure functions.

    c   = ReLU(W_e (x - b_dec) + b_e)       W_e in R^{m x d}, b_e in R^m
    x^  = D^ c + b_dec,  D^_j = D_j / ||D_j||   decoder atoms normalised on the forward pass
    L   = (1/d) ||x - x^||^2 + alpha * L1(c)   averaged over the batch
    L1  = ||c||_1 / m  ("report" convention)  or  ||c||_1  ("sum" convention)

The decoder bias b_dec in R^d is optional (`SAEParams.b_dec_D`, None by default): the report's
SAE has none, and with None it is absent from the computation, not a zero. Set, it is subtracted
before the encoder and added back after the decoder (as in SAELens, sparsify and
dictionary_learning), so latents are not spent on the data's offset; its initial value is zero,
the data mean or a geometric median (`decoder_bias_init`).

The decoder is stored as rows D_MxD (atom j is row j). It is orthogonally initialised; the
encoder is Xavier-uniform (or tied: W_e = D at init) with zero bias. The gradient flows through
the normalisation.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
L1Convention = Literal["report", "sum"]
L1_CONVENTIONS = ("report", "sum")
DECODER_BIAS_INITS = ("none", "zero", "mean", "median")
# Matmul operand dtypes of the fast paths (`fused`, `sparse`): float32 accumulation either way
COMPUTE_DTYPES = ("float32", "bfloat16")


class SAEParams(NamedTuple):
    W_enc_MxD: Array
    b_enc_M: Array
    D_MxD: Array
    b_dec_D: Array | None = None  # the decoder bias; None: the SAE has none (the report's)


class ThresholdSAEParams(NamedTuple):
    """SAEParams plus log theta (m,): JumpReLU's trained thresholds, or BatchTopK's estimated
    inference threshold (the same for every latent). See `sae_jax.archs`."""

    W_enc_MxD: Array
    b_enc_M: Array
    D_MxD: Array
    log_threshold_M: Array
    b_dec_D: Array | None = None


def with_threshold(params: SAEParams, log_threshold_M: Array) -> ThresholdSAEParams:
    """`params` (decoder bias included) with log theta added."""
    return ThresholdSAEParams(params.W_enc_MxD, params.b_enc_M, params.D_MxD, log_threshold_M,
                              params.b_dec_D)


class LossAux(NamedTuple):
    mse: Array  # (1/d) ||x - x^||^2, batch mean
    l1: Array  # L1(c), batch mean, in the chosen convention (before alpha)
    l0: Array  # mean number of active latents per sample
    fired_M: Array  # bool: latent fired (c > 0) on some sample of the batch
    sq_err_B: Array  # per-sample ||t - x^||^2


def init(key: Array, d: int, m: int, tied: bool = False) -> SAEParams:
    """Orthogonal decoder, zero bias, and a Xavier-uniform encoder, or with `tied` the encoder
    W_e = D (each latent starts reading the direction it writes)."""
    k_enc, k_dec = jax.random.split(key)
    w_enc = jax.nn.initializers.xavier_uniform()(k_enc, (m, d), jnp.float32)
    dec = jax.nn.initializers.orthogonal()(k_dec, (m, d), jnp.float32)
    return SAEParams(dec if tied else w_enc, jnp.zeros((m,), jnp.float32), dec)


def unit_rows(w: Array, eps: float = 1e-8) -> Array:
    """Each row divided by its Euclidean norm: a = w / n, n = s ||w / s|| + eps, s = max |w_i|
    (held constant), so that huge rows do not overflow the norm. Its VJP is autodiff's,
    dL/dw = g / n - (g . w / n^2) (s / (2 r)) 2 u / s with u = w / s, r = ||u||, written out with
    every division by a row statistic as a product with its reciprocal: XLA:CPU rewrites such
    divisions in some programs and not in others (the per-device programs of a sharded grid), so
    the explicit form keeps a cell's gradient the same wherever it is compiled."""
    return _unit_rows(w, eps)


def _unit_rows_fwd(w: Array, eps: float) -> tuple[Array, tuple[Array, ...]]:
    s = jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    s = jnp.where(s > 0, s, 1.0)
    inv_s = 1.0 / s
    r = jnp.sqrt(jnp.sum(jnp.square(w * inv_s), axis=-1, keepdims=True))
    n = s * r + eps
    return w * (1.0 / n), (w, s, inv_s, r, n)


def _unit_rows_bwd(eps: float, res: tuple[Array, ...], g: Array) -> tuple[Array]:
    del eps
    w, s, inv_s, r, n = res
    gw = jnp.sum(g * (1.0 / (n * n)) * w, axis=-1, keepdims=True)  # g . w / n^2
    d_r2 = s * -gw * (0.5 / r)  # the cotangent of r^2 = sum u^2
    u = w * inv_s
    return (g * (1.0 / n) + (u * d_r2 + u * d_r2) * inv_s,)


_unit_rows = jax.custom_vjp(lambda w, eps: _unit_rows_fwd(w, eps)[0], nondiff_argnums=(1,))
_unit_rows.defvjp(_unit_rows_fwd, _unit_rows_bwd)


def centred(params: SAEParams, x_BxD: Array) -> Array:
    """x - b_dec (x itself when the SAE has no decoder bias)."""
    return x_BxD if params.b_dec_D is None else x_BxD - params.b_dec_D


def encode(params: SAEParams, x_BxD: Array) -> Array:
    """c = ReLU(W_e (x - b_dec) + b_e)."""
    return jax.nn.relu(centred(params, x_BxD) @ params.W_enc_MxD.T + params.b_enc_M)


def decode(params: SAEParams, c_BxM: Array) -> Array:
    """x^ = sum_j c_j D_j / ||D_j|| + b_dec."""
    x_hat = c_BxM @ unit_rows(params.D_MxD)
    return x_hat if params.b_dec_D is None else x_hat + params.b_dec_D


def decoder_bias_init(x_NxD: Array, method: str, iters: int = 50) -> Array:
    """b_dec's initial value from a data sample: zeros ("zero"), the mean ("mean"), or the
    geometric median argmin_y sum_n ||x_n - y|| ("median", Weiszfeld's iteration
    y <- sum_n w_n x_n / sum_n w_n with w_n = 1 / max(||x_n - y||, 1e-8), from the mean)."""
    x = jnp.asarray(x_NxD, jnp.float32)
    if method == "zero":
        return jnp.zeros(x.shape[-1], jnp.float32)
    mean = jnp.mean(x, axis=0)
    if method == "mean":
        return mean
    if method != "median":
        raise ValueError(f"decoder bias init must be one of {DECODER_BIAS_INITS[1:]}, got {method!r}")

    def step(y, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), 1e-8)
        return jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w), None

    return jax.lax.scan(step, mean, None, length=iters)[0]


def dictionary(params: SAEParams) -> Array:
    """The learned dictionary: unit-norm atoms as rows (m x d)."""
    return unit_rows(params.D_MxD)


def l1_penalty(c_BxM: Array, convention: L1Convention = "report") -> Array:
    """Batch mean of ||c||_1 / m (report) or ||c||_1 (sum)."""
    per_sample = jnp.sum(jnp.abs(c_BxM), axis=-1)
    if convention == "report":
        per_sample = per_sample / c_BxM.shape[-1]
    elif convention != "sum":
        raise ValueError(f"l1 convention must be one of {L1_CONVENTIONS}, got {convention!r}")
    return jnp.mean(per_sample)


def loss(params: SAEParams, x_BxD: Array, l1_coeff: Array, convention: L1Convention = "report",
         target_BxD: Array | None = None) -> tuple[Array, LossAux]:
    """L = mean_b (1/d)||t - x^||^2 + alpha * L1(c), c = encode(x), x^ = decode(c); t = x unless a
    denoising target is given."""
    target = x_BxD if target_BxD is None else target_BxD
    c = encode(params, x_BxD)
    x_hat = decode(params, c)
    sq = jnp.square(target - x_hat)
    mse = jnp.mean(sq)
    l1 = l1_penalty(c, convention)
    active = c > 0
    aux = LossAux(mse, l1, jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)),
                  jnp.any(active, axis=0), jnp.sum(sq, axis=-1))
    return mse + l1_coeff * l1, aux
