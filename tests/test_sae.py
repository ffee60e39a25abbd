"""The SAE: decoder atoms normalised on the forward pass, the loss in both L1 conventions,
gradients through the normalisation, and the initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import sae

D, M, B = 16, 24, 32


def _params(seed: int = 0, m: int = M) -> sae.SAEParams:
    """Random parameters with decoder rows of very different norms and a non-zero bias."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    scale = jax.random.uniform(k4, (m, 1), minval=0.2, maxval=5.0)
    return sae.SAEParams(
        W_enc_MxD=0.5 * jax.random.normal(k1, (m, D)),
        b_enc_M=0.1 * jax.random.normal(k2, (m,)),
        D_MxD=scale * jax.random.normal(k3, (m, D)),
    )


def _x(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (B, D))


def _np_loss(p: sae.SAEParams, x: np.ndarray, alpha: float, convention: str):
    """Float64 reference: (mean_b (1/d)||x - x^||^2, mean_b L1)."""
    w, b, dec = (np.asarray(a, np.float64) for a in p[:3])
    x = np.asarray(x, np.float64)
    c = np.maximum(x @ w.T + b, 0.0)
    x_hat = c @ (dec / np.linalg.norm(dec, axis=1, keepdims=True))
    mse = np.mean(np.sum((x - x_hat) ** 2, axis=1) / x.shape[1])
    l1 = np.mean(np.abs(c).sum(axis=1) / (c.shape[1] if convention == "report" else 1))
    return mse, l1, c


def test_decoder_row_scale_does_not_change_output():
    p, x = _params(), _x()
    c = sae.encode(p, x)
    scaled = p._replace(D_MxD=p.D_MxD.at[3].multiply(7.0).at[10].multiply(0.01))
    np.testing.assert_allclose(sae.decode(scaled, c), sae.decode(p, c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.loss(scaled, x, 0.3)[0], sae.loss(p, x, 0.3)[0], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(sae.dictionary(p), axis=1), 1.0, atol=1e-5)
    # A sign flip is not a rescaling: it must change the output.
    flipped = p._replace(D_MxD=p.D_MxD.at[3].multiply(-1.0))
    c3 = c.at[:, 3].set(1.0)
    assert not np.allclose(sae.decode(flipped, c3), sae.decode(p, c3))


@pytest.mark.parametrize("convention", ["report", "sum"])
@pytest.mark.parametrize("alpha", [0.0, 0.37])
def test_loss_matches_hand_computation(convention, alpha):
    p, x = _params(), _x()
    total, aux = jax.jit(sae.loss, static_argnums=3)(p, x, alpha, convention)
    mse, l1, c = _np_loss(p, x, alpha, convention)
    assert float(aux.mse) == pytest.approx(mse, rel=1e-4)
    assert float(aux.l1) == pytest.approx(l1, rel=1e-4)
    assert float(total) == pytest.approx(mse + alpha * l1, rel=1e-4)
    assert float(aux.l0) == pytest.approx((c > 0).sum(axis=1).mean(), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(aux.fired_M), (c > 0).any(axis=0))
    assert 0 < (c > 0).mean() < 1  # the case exercises the ReLU


def test_report_convention_divides_by_m():
    p, x = _params(), _x()
    _, report = sae.loss(p, x, 1.0, "report")
    _, summed = sae.loss(p, x, 1.0, "sum")
    assert float(summed.l1) == pytest.approx(M * float(report.l1), rel=1e-5)
    assert float(report.mse) == float(summed.mse)


def test_denoising_target_replaces_input_in_mse():
    p, x = _params(), _x()
    target = x + 1.0
    _, aux = sae.loss(p, x, 0.0, "report", target)
    x_hat = sae.decode(p, sae.encode(p, x))
    assert float(aux.mse) == pytest.approx(float(jnp.mean(jnp.square(target - x_hat))), rel=1e-5)


def test_unknown_convention_raises():
    with pytest.raises(ValueError):
        sae.loss(_params(), _x(), 0.1, "mean")


def test_gradient_has_no_radial_component_on_decoder():
    """L depends on D_j only through D_j/||D_j||, so dL/dD_j is orthogonal to D_j."""
    p, x = _params(), _x()
    grads = jax.grad(lambda q: sae.loss(q, x, 0.2)[0])(p)
    g, dec = np.asarray(grads.D_MxD, np.float64), np.asarray(p.D_MxD, np.float64)
    radial = np.sum(g * dec, axis=1) / np.linalg.norm(dec, axis=1)
    norm_g = np.linalg.norm(g, axis=1)
    assert np.all(norm_g[np.asarray(sae.encode(p, x)).max(axis=0) > 0] > 1e-4)  # live atoms move
    assert np.all(np.abs(radial) <= 1e-4 * norm_g + 1e-7)
    # The gradient scales as 1/||D_j||: doubling a row halves its gradient.
    grads2 = jax.grad(lambda q: sae.loss(q, x, 0.2)[0])(p._replace(D_MxD=2 * p.D_MxD))
    np.testing.assert_allclose(grads2.D_MxD, grads.D_MxD / 2, rtol=1e-4, atol=1e-7)


def test_unit_rows_gradient_is_autodiffs_of_the_formula():
    """unit_rows' hand-written VJP (reciprocals, so that XLA cannot compile it differently per
    device) equals autodiff's of w / (s ||w / s|| + eps), s = max |w| held constant, under vmap,
    for huge rows; a zero row's is NaN, as autodiff's."""
    def formula(w, eps=1e-8):
        s = jax.lax.stop_gradient(jnp.max(jnp.abs(w), axis=-1, keepdims=True))
        s = jnp.where(s > 0, s, 1.0)
        return w / (s * jnp.linalg.norm(w / s, axis=-1, keepdims=True) + eps)

    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    w = jax.random.normal(k1, (3, 20, 9)).at[1, 4].multiply(1e30).at[2, 7].set(0.0)
    g = jax.random.normal(k2, w.shape)
    want_a = jax.vmap(formula)(w)
    want = jax.grad(lambda w: jnp.sum(jax.vmap(formula)(w) * g))(w)
    a = jax.jit(jax.vmap(sae.unit_rows))(w)
    got = jax.jit(jax.grad(lambda w: jnp.sum(jax.vmap(sae.unit_rows)(w) * g)))(w)
    np.testing.assert_allclose(a, want_a, rtol=1e-6, atol=1e-7)
    finite = np.isfinite(np.asarray(want))
    assert (~finite).sum() == 9 and np.array_equal(finite, np.isfinite(np.asarray(got)))
    scale = np.max(np.abs(np.asarray(want)[finite].reshape(-1, 9)), axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got)[finite].reshape(-1, 9) / scale,
                               np.asarray(want)[finite].reshape(-1, 9) / scale, atol=1e-6)


@pytest.mark.parametrize("m", [8, 16, 40])
def test_init_is_orthogonal_decoder_xavier_encoder_zero_bias(m):
    p = sae.init(jax.random.PRNGKey(3), D, m)
    assert p.W_enc_MxD.shape == (m, D) and p.D_MxD.shape == (m, D) and p.b_enc_M.shape == (m,)
    dec = np.asarray(p.D_MxD, np.float64)
    if m <= D:  # orthonormal rows
        np.testing.assert_allclose(dec @ dec.T, np.eye(m), atol=1e-5)
    else:  # orthonormal columns
        np.testing.assert_allclose(dec.T @ dec, np.eye(D), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(p.b_enc_M), 0)
    bound = np.sqrt(6 / (m + D))
    w = np.asarray(p.W_enc_MxD)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    again = sae.init(jax.random.PRNGKey(3), D, m)
    other = sae.init(jax.random.PRNGKey(4), D, m)
    np.testing.assert_array_equal(np.asarray(again.D_MxD), dec.astype(np.float32))
    assert not np.allclose(other.D_MxD, dec)


def test_tied_init_starts_the_encoder_as_the_decoder():
    plain, tied = sae.init(jax.random.PRNGKey(3), D, 40), sae.init(jax.random.PRNGKey(3), D, 40, tied=True)
    np.testing.assert_array_equal(np.asarray(tied.W_enc_MxD), np.asarray(tied.D_MxD))
    np.testing.assert_array_equal(np.asarray(tied.D_MxD), np.asarray(plain.D_MxD))  # same decoder
