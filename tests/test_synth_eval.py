"""SynthSAEBench's metrics (SAELens's definitions) on SAEs whose answers are known, and, where
sae_lens is installed, against SAELens's own functions."""

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import synth_eval

D, F, N = 16, 12, 3000


@pytest.fixture(scope="module")
def world():
    """Orthonormal features (F <= d), sparse non-negative activations, x = a G."""
    rng = np.random.default_rng(0)
    g = np.linalg.qr(rng.normal(size=(D, D)))[0][:F].astype(np.float32)
    acts = (rng.random((N, F)) < 0.2) * rng.uniform(0.5, 2.0, (N, F))
    acts = acts.astype(np.float32)
    return g, acts, acts @ g


def _batches(x, acts, size):
    return [(x[i:i + size], acts[i:i + size]) for i in range(0, len(x), size)]


def test_a_perfect_sae_scores_one_everywhere(world):
    g, acts, x = world
    # recovers a (orthonormal features; float32 leaves ~1e-7 where a feature is off)
    enc = lambda x_: jnp.where(x_ @ g.T > 1e-3, x_ @ g.T, 0.0)
    dec = lambda c: c @ g
    out = synth_eval.evaluate(enc, dec, g, g, _batches(x, acts, 512))
    for k in ("mcc", "uniqueness", "precision", "recall", "f1", "accuracy", "explained_variance", "shrinkage"):
        assert out[k] == pytest.approx(1.0, abs=1e-5), k
    assert out["dead_latents"] == 0
    assert out["l0"] == pytest.approx(out["true_l0"]) == pytest.approx((acts > 0).sum(1).mean())


def test_duplicates_halve_uniqueness_and_a_latent_that_always_fires_has_the_features_rate(world):
    g, acts, x = world
    twice = np.concatenate([g, g])
    assert synth_eval.uniqueness(twice, g) == pytest.approx(0.5)
    assert synth_eval.mcc(twice, g) == pytest.approx(1.0)  # F matched pairs of |cos| 1
    assert synth_eval.mcc(-g[::-1], g) == pytest.approx(1.0)  # sign and order do not matter
    one = g[:1]
    out = synth_eval.evaluate(lambda x_: jnp.ones((x_.shape[0], 1)), lambda c: c @ one, one, g,
                              _batches(x, acts, 700))
    rate = (acts[:, 0] > 0).mean()
    assert out["precision"] == pytest.approx(rate, rel=1e-5) and out["recall"] == 1.0
    assert out["f1"] == pytest.approx(2 * rate / (1 + rate), rel=1e-5)
    never = synth_eval.evaluate(lambda x_: jnp.zeros((x_.shape[0], 3)), lambda c: jnp.zeros((c.shape[0], D)),
                                g[:3], g, _batches(x, acts, 1000))
    assert never["dead_latents"] == 3 and never["precision"] == never["recall"] == never["f1"] == 0.0
    assert never["explained_variance"] == pytest.approx(1 - (x ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)


def test_batching_does_not_change_the_numbers(world):
    g, acts, x = world
    rng = np.random.default_rng(1)
    w = (g + 0.3 * rng.normal(size=g.shape)).astype(np.float32)
    enc = lambda x_: jnp.maximum(x_ @ w.T - 0.2, 0.0)
    dec = lambda c: c @ w + 0.01
    one = synth_eval.evaluate(enc, dec, w, g, _batches(x, acts, N))
    many = synth_eval.evaluate(enc, dec, w, g, _batches(x, acts, 128))
    for k in synth_eval.METRICS:
        assert one[k] == pytest.approx(many[k], rel=1e-5, abs=1e-6), k
    with pytest.raises(ValueError, match="at least one batch"):
        synth_eval.evaluate(enc, dec, w, g, [])


def test_one_pass_over_many_saes_equals_one_pass_each(world):
    """evaluate_many (a grid's cells: each batch drawn once, encoded by every SAE) gives each SAE
    what evaluate gives it alone on the same batches, and draws every batch exactly once."""
    g, acts, x = world
    rng = np.random.default_rng(3)
    saes = []
    for i, m in enumerate((F, F + 3, 5)):
        w = (np.resize(g, (m, D)) + 0.2 * (i + 1) * rng.normal(size=(m, D))).astype(np.float32)
        saes.append((lambda x_, w=w, t=0.1 * i: jnp.maximum(x_ @ w.T - t, 0.0), lambda c, w=w: c @ w, w))
    drawn = []

    def batches():
        for b in _batches(x, acts, 700):
            drawn.append(1)
            yield b

    many = synth_eval.evaluate_many(saes, g, batches())
    assert len(drawn) == -(-N // 700)
    for (enc, dec, w), got in zip(saes, many):
        want = synth_eval.evaluate(enc, dec, w, g, _batches(x, acts, 700))
        assert got == want
    with pytest.raises(ValueError, match="at least one batch"):
        synth_eval.evaluate_many(saes, g, [])


def test_agrees_with_saelens_functions(world):
    """SAELens itself (the bench extra, which the README's test command installs)."""
    import torch
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import evals as sl

    g, acts, x = world
    rng = np.random.default_rng(2)
    w = (np.concatenate([g, g[:4]]) + 0.4 * rng.normal(size=(F + 4, D))).astype(np.float32)
    codes = np.maximum(x @ w.T - 0.3, 0).astype(np.float32)
    x_hat = codes @ w
    ours = synth_eval.evaluate(lambda x_: jnp.asarray(codes), lambda c: jnp.asarray(x_hat), w, g, [(x, acts)])
    t = lambda a: torch.from_numpy(np.asarray(a))
    assert ours["mcc"] == pytest.approx(sl.mean_correlation_coefficient(t(w), t(g)), abs=1e-5)
    assert ours["uniqueness"] == pytest.approx(sl.feature_uniqueness(t(w), t(g)), abs=1e-6)
    cls = sl.compute_classification_metrics(t(codes), t(acts), t(w), t(g))
    for ours_key, theirs in (("precision", cls.precision), ("recall", cls.recall), ("f1", cls.f1_score),
                             ("accuracy", cls.accuracy)):
        assert ours[ours_key] == pytest.approx(theirs, abs=1e-5), ours_key
    ev = ExplainedVarianceCalculator()
    ev.add_batch(t(x_hat), t(x))
    assert ours["explained_variance"] == pytest.approx(ev.compute(), abs=1e-5)
    shrink = sl.ShrinkageCalculator()
    shrink.add_batch(t(x_hat), t(x))
    assert ours["shrinkage"] == pytest.approx(shrink.compute(), rel=1e-5)
