"""A GPT-2-style decoder-only transformer as pure `init` / `apply` functions.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"):
pre-LayerNorm residual blocks with causal multi-head self-attention and a GELU MLP, learned
positional embeddings, a final LayerNorm, and an unembedding tied to the token embedding:

    h_0      = W_E[tokens] + W_P[0:L]
    for l = 0 .. N-1:
      h_l'    = h_l + Attn_l(LN(h_l))                  (causal softmax(q kᵀ/√d_head) v, H heads)
      a_l     = GELU(LN(h_l') W_in + b_in)             (the post-GELU MLP activation, width F)
      h_{l+1} = h_l' + a_l W_out + b_out
    logits   = LN(h_N) W_Eᵀ

GELU is GPT-2's tanh approximation. Initialisation follows GPT-2: N(0, 0.02²) weights, with the
projections into the residual stream scaled by 1/√(2N).

`apply` returns the logits and, for each layer index in `capture_layers` (0-based), the MLP
activation `a_l` of shape (B, L, F). Under `jax.jit`, layers after the last captured one are
dead code when only the activations are used, so harvesting needs no second model.

Flax Linen is used purely: `init` returns a parameter pytree, `apply` is a function of it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static model hyperparameters (hashable, so it can be a `jit` static argument)."""

    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    d_mlp: int = 1024
    vocab_size: int = 256
    context_len: int = 128
    init_std: float = 0.02
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "vocab_size", "context_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def _dense(cfg: TransformerConfig, features: int, name: str, residual: bool = False) -> nn.Dense:
    """GPT-2 init: N(0, 0.02²); projections into the residual stream scaled by 1/sqrt(2·n_layers)."""
    std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual else cfg.init_std
    return nn.Dense(features, kernel_init=nn.initializers.normal(std), name=name)


class _Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, _ = x_BxLxD.shape
        qkv_BxLx3D = _dense(cfg, 3 * cfg.d_model, "qkv")(x_BxLxD)
        qkv_3xBxHxLxK = qkv_BxLx3D.reshape(B, L, 3, cfg.n_heads, cfg.d_head).transpose(2, 0, 3, 1, 4)
        q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = qkv_3xBxHxLxK
        att_BxHxLxL = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxLxK, k_BxHxLxK) / jnp.sqrt(cfg.d_head)
        causal_LxL = jnp.tril(jnp.ones((L, L), dtype=bool))
        att_BxHxLxL = jnp.where(causal_LxL, att_BxHxLxL, jnp.finfo(att_BxHxLxL.dtype).min)
        att_BxHxLxL = jax.nn.softmax(att_BxHxLxL, axis=-1)
        out_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", att_BxHxLxL, v_BxHxLxK)
        out_BxLxD = out_BxHxLxK.transpose(0, 2, 1, 3).reshape(B, L, cfg.d_model)
        return _dense(cfg, cfg.d_model, "proj", residual=True)(out_BxLxD)


class _Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        x_BxLxD = x_BxLxD + _Attention(cfg, name="attn")(nn.LayerNorm(cfg.ln_eps, name="ln_attn")(x_BxLxD))
        h_BxLxD = nn.LayerNorm(cfg.ln_eps, name="ln_mlp")(x_BxLxD)
        act_BxLxF = jax.nn.gelu(_dense(cfg, cfg.d_mlp, "mlp_in")(h_BxLxD))
        x_BxLxD = x_BxLxD + _dense(cfg, cfg.d_model, "mlp_out", residual=True)(act_BxLxF)
        return x_BxLxD, act_BxLxF


class _GPT(nn.Module):
    cfg: TransformerConfig
    capture_layers: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array) -> tuple[jax.Array, dict[int, jax.Array]]:
        cfg = self.cfg
        L = tokens_BxL.shape[1]
        init = nn.initializers.normal(cfg.init_std)
        wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, name="wte")
        wpe_CxD = self.param("wpe", nn.initializers.normal(cfg.init_std / 2), (cfg.context_len, cfg.d_model))
        x_BxLxD = wte(tokens_BxL) + wpe_CxD[None, :L]
        acts: dict[int, jax.Array] = {}
        for layer in range(cfg.n_layers):
            x_BxLxD, act_BxLxF = _Block(cfg, name=f"block_{layer}")(x_BxLxD)
            if layer in self.capture_layers:
                acts[layer] = act_BxLxF
        x_BxLxD = nn.LayerNorm(cfg.ln_eps, name="ln_f")(x_BxLxD)
        logits_BxLxV = wte.attend(x_BxLxD)
        return logits_BxLxV, acts


def _check_capture(cfg: TransformerConfig, capture_layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(i) for i in capture_layers)
    for i in layers:
        if not 0 <= i < cfg.n_layers:
            raise ValueError(f"capture layer {i} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    return layers


def _init(key: jax.Array, cfg: TransformerConfig) -> dict:
    tokens_1xL = jnp.zeros((1, cfg.context_len), dtype=jnp.int32)
    return _GPT(cfg).init(key, tokens_1xL)["params"]


_jit_init = jax.jit(_init, static_argnums=(1,))


def init(key: jax.Array, cfg: TransformerConfig) -> dict:
    """Return the parameter pytree of a freshly initialised model (GPT-2 initialisation)."""
    return _jit_init(key, cfg)


def apply(
    params: dict,
    tokens_BxL: jax.Array,
    cfg: TransformerConfig,
    capture_layers: Sequence[int] = (),
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """Forward pass: token ids (B, L ≤ context_len) -> (logits (B, L, V), {layer: a_layer (B, L, F)}).

    Position t's outputs depend only on tokens[:, :t+1] (causal attention).
    """
    if tokens_BxL.ndim != 2:
        raise ValueError(f"tokens must have shape (B, L), got {tokens_BxL.shape}")
    if tokens_BxL.shape[1] > cfg.context_len:
        raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds context_len={cfg.context_len}")
    layers = _check_capture(cfg, capture_layers)
    return _GPT(cfg, layers).apply({"params": params}, tokens_BxL)


def count_params(params: dict) -> int:
    """Total number of scalar parameters."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def forward_flops(cfg: TransformerConfig, batch: int, seq_len: int, through_layer: int | None = None) -> int:
    """Forward-pass FLOPs (2 per multiply-add) of `apply` on a (batch, seq_len) token array.

    Per layer, with T = batch·seq_len tokens: qkv 2·T·D·3D, scores and mixing 2·(2·batch·L²·D),
    output projection 2·T·D², MLP 2·(2·T·D·F). The unembedding adds 2·T·D·V. With
    `through_layer=l`, the work a harvest of layer l's activations needs: layers 0..l-1, and
    layer l up to its GELU (no MLP output projection, no unembedding).
    Softmax, LayerNorm and GELU are elementwise and omitted.
    """
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    T = batch * seq_len
    per_layer = 2 * T * D * 3 * D + 2 * 2 * batch * seq_len * seq_len * D + 2 * T * D * D + 2 * 2 * T * D * F
    if through_layer is None:
        return cfg.n_layers * per_layer + 2 * T * D * V
    return (through_layer + 1) * per_layer - 2 * T * F * D
