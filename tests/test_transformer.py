"""Behaviour of the GPT-2-style transformer: shapes, causality, a reference forward pass, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import transformer
from sae_jax.transformer import TransformerConfig

CFG = TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=50, context_len=16)
_apply = jax.jit(transformer.apply, static_argnums=(2, 3))


def apply(params, tokens_BxL, capture_layers=()):
    return _apply(params, tokens_BxL, CFG, tuple(capture_layers))


@pytest.fixture(scope="module")
def params():
    return transformer.init(jax.random.key(0), CFG)


def _tokens(key, B, L, V=CFG.vocab_size):
    return jax.random.randint(jax.random.key(key), (B, L), 0, V)


def test_shapes_and_captured_layers(params):
    tokens_BxL = _tokens(1, 3, 10)  # shorter than the context
    logits, acts = apply(params, tokens_BxL, capture_layers=(0, 1))
    assert logits.shape == (3, 10, CFG.vocab_size)
    assert sorted(acts) == [0, 1]
    assert all(a.shape == (3, 10, CFG.d_mlp) for a in acts.values())
    assert apply(params, tokens_BxL)[1] == {}
    # post-GELU: bounded below by min_x x·Φ(x) ≈ -0.17
    assert float(jnp.min(acts[0])) > -0.2


def test_bad_inputs_raise(params):
    with pytest.raises(ValueError, match="out of range"):
        transformer.apply(params, _tokens(1, 1, 4), CFG, capture_layers=(2,))
    with pytest.raises(ValueError, match="exceeds context_len"):
        transformer.apply(params, _tokens(1, 1, 17), CFG)
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=30, n_heads=4)


def test_causal_by_gradient(params):
    """d(output at position t)/d(input embedding at position s) is zero for s > t, nonzero for s ≤ t."""
    tokens_1xL = _tokens(2, 1, CFG.context_len)
    t = 7

    def out_t(delta_LxD):  # delta is added to the input embedding of each position (through wpe)
        p = {**params, "wpe": params["wpe"] + delta_LxD}
        logits, acts = transformer.apply(p, tokens_1xL, CFG, capture_layers=(1,))
        return logits[0, t].sum() + acts[1][0, t].sum()

    grad_LxD = jax.jit(jax.grad(out_t))(jnp.zeros((CFG.context_len, CFG.d_model)))
    norms_L = np.linalg.norm(np.asarray(grad_LxD), axis=-1)
    assert np.all(norms_L[t + 1 :] == 0.0)
    assert np.all(norms_L[: t + 1] > 0.0)


def test_causal_by_perturbation(params):
    """Changing tokens after position t leaves every output at positions ≤ t unchanged."""
    a_BxL = _tokens(3, 2, CFG.context_len)
    t = 5
    b_BxL = a_BxL.at[:, t + 1 :].set((a_BxL[:, t + 1 :] + 1) % CFG.vocab_size)
    la, aa = apply(params, a_BxL, capture_layers=(0, 1))
    lb, ab = apply(params, b_BxL, capture_layers=(0, 1))
    np.testing.assert_allclose(la[:, : t + 1], lb[:, : t + 1], atol=1e-5)
    for layer in (0, 1):
        np.testing.assert_allclose(aa[layer][:, : t + 1], ab[layer][:, : t + 1], atol=1e-5)
    assert not np.allclose(la[:, t + 1 :], lb[:, t + 1 :], atol=1e-3)


def _reference_forward(params, tokens_L):
    """Independent numpy GPT-2 forward pass for one sequence."""
    P = jax.tree.map(np.asarray, params)

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + CFG.ln_eps) * p["scale"] + p["bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    L, H, K = len(tokens_L), CFG.n_heads, CFG.d_head
    x = P["wte"]["embedding"][tokens_L] + P["wpe"][:L]
    acts = []
    for layer in range(CFG.n_layers):
        b = P[f"block_{layer}"]
        qkv = ln(x, b["ln_attn"]) @ b["attn"]["qkv"]["kernel"] + b["attn"]["qkv"]["bias"]
        q, k, v = (qkv[:, i * CFG.d_model : (i + 1) * CFG.d_model].reshape(L, H, K) for i in range(3))
        heads = []
        for h in range(H):
            s = q[:, h] @ k[:, h].T / np.sqrt(K) + np.triu(np.full((L, L), -np.inf), 1)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[:, h])
        x = x + np.concatenate(heads, -1) @ b["attn"]["proj"]["kernel"] + b["attn"]["proj"]["bias"]
        a = gelu(ln(x, b["ln_mlp"]) @ b["mlp_in"]["kernel"] + b["mlp_in"]["bias"])
        acts.append(a)
        x = x + a @ b["mlp_out"]["kernel"] + b["mlp_out"]["bias"]
    return ln(x, P["ln_f"]) @ P["wte"]["embedding"].T, acts


def test_matches_numpy_reference(params):
    # Larger-than-init weights so that attention and the MLP matter in the comparison.
    scaled = jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, params)
    tokens_1xL = _tokens(4, 1, 12)
    logits, acts = apply(scaled, tokens_1xL, capture_layers=(0, 1))
    ref_logits, ref_acts = _reference_forward(scaled, np.asarray(tokens_1xL[0]))
    np.testing.assert_allclose(logits[0], ref_logits, rtol=2e-4, atol=2e-4)
    for layer in (0, 1):
        np.testing.assert_allclose(acts[layer][0], ref_acts[layer], rtol=2e-4, atol=2e-4)


def test_parameter_count_matches_gpt2_formula(params):
    D, F, V, C = CFG.d_model, CFG.d_mlp, CFG.vocab_size, CFG.context_len
    per_block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
    assert transformer.count_params(params) == V * D + C * D + CFG.n_layers * per_block + 2 * D


def test_forward_flops_agree_with_xla(params):
    """Our matmul FLOP count is XLA's count of the whole forward pass less its elementwise work (< 15%)."""
    tokens_BxL = _tokens(5, 4, CFG.context_len)
    compiled = jax.jit(lambda p, t: transformer.apply(p, t, CFG)[0]).lower(params, tokens_BxL).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = transformer.forward_flops(CFG, 4, CFG.context_len)
    assert ours <= cost["flops"] <= 1.15 * ours
