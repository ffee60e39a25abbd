"""SynthSAEBench worlds: `sample` against SAELens's own generator on a model SAELens saved
(tests/fixtures/synth_small_saelens, made by tests/fixtures/make_synth_fixture.py with
sae-lens 6.54.12), the hierarchy's constraints, jit and determinism, the presets.

Tolerances come from sampling error. Ours and SAELens's estimates are independent, so a
difference of means has standard error se = sqrt(v1 / n1 + v2 / n2) (v the per-sample variance:
p (1 - p) for a firing indicator, the variance of a_f given a_f > 0 over the k1, k2 firing
samples for a magnitude, Var(L0) and Var(x_d) for L0 and x). Over the ~400 features (~500 pairs)
a correct sampler's largest |difference| / se exceeds 5 with probability < 1e-3; chi^2 / dof
of the firing rates stays below 1.35 (391 dof: 1.35 is 7 standard deviations).
"""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import native, st, synth
from sae_jax.synth_models import (
    firing_probabilities,
    from_config,
    preset_config,
    torch_randn,
)

FIXTURE = Path(__file__).parent / "fixtures" / "synth_small_saelens"
N_CHUNKS, CHUNK = 4, 50_000  # 200k samples, as many as SAELens's statistics
K = 32  # co-firing among the first K features


@pytest.fixture(scope="module")
def saelens_world() -> synth.SynthWorld:
    return synth.load_saelens(FIXTURE / "model")


@pytest.fixture(scope="module")
def saelens_stats() -> dict:
    return dict(np.load(FIXTURE / "stats.npz"))


@functools.partial(jax.jit, static_argnums=2)
def _chunk_stats(key, world, n):
    x, a = synth.sample(key, world, n)
    on = a > 0
    l0 = on.sum(1).astype(jnp.float32)
    onk = on[:, :K].astype(jnp.float32)
    return {"count": on.sum(0), "l0": l0.sum(), "l02": (l0 * l0).sum(), "mag": a.sum(0),
            "mag2": (a * a).sum(0), "x": x.sum(0), "x2": (x * x).sum(0), "cof": onk.T @ onk,
            "viol": jnp.stack(synth.hierarchy_violations(world, a))}


@pytest.fixture(scope="module")
def our_stats(saelens_world) -> dict:
    """Our estimates of the statistics make_synth_fixture.py stored, from 200k samples."""
    tot = None
    for i in range(N_CHUNKS):
        s = jax.tree.map(lambda v: np.asarray(v, np.float64),
                         _chunk_stats(jax.random.PRNGKey(1000 + i), saelens_world, CHUNK))
        tot = s if tot is None else jax.tree.map(np.add, tot, s)
    n = N_CHUNKS * CHUNK
    cnt = np.maximum(tot["count"], 1)
    mag = tot["mag"] / cnt
    return {"n": n, "count": tot["count"], "rate_F": tot["count"] / n, "l0_mean": tot["l0"] / n,
            "l0_var": tot["l02"] / n - (tot["l0"] / n) ** 2, "mag_mean_F": mag,
            "mag_var_F": tot["mag2"] / cnt - mag ** 2, "x_mean_D": tot["x"] / n,
            "x_var_D": tot["x2"] / n - (tot["x"] / n) ** 2, "cofire_KxK": tot["cof"] / n,
            "viol": tot["viol"]}


def _z(a, b, se):
    return np.abs(a - b) / np.maximum(se, 1e-12)


def test_load_redraws_saelens_magnitudes(saelens_world, saelens_stats):
    # SAELens does not save mu_f and sigma_f; its load redraws them (folded normal from torch's
    # generator, seed + 1). Ours replays torch's stream: the same numbers, without torch.
    np.testing.assert_allclose(saelens_world.mean_F, saelens_stats["mean_F"], rtol=1e-6)
    np.testing.assert_allclose(saelens_world.std_F, saelens_stats["std_F"], rtol=1e-5, atol=1e-6)
    assert np.ptp(saelens_stats["std_F"]) > 0.5  # really drawn, not constant


def test_torch_randn_needs_its_preconditions():
    with pytest.raises(ValueError):
        torch_randn((8,), 0)
    with pytest.raises(ValueError):
        torch_randn((32,), -1)
    a, b = torch_randn((17, 40), 3)
    assert a.shape == (17,) and b.shape == (40,) and abs(float(np.mean(b))) < 0.5


def test_from_config_rebuilds_the_saved_model(saelens_world):
    """The config alone gives SAELens's dictionary (after its orthogonalisation), bias, copula,
    compensated probabilities and forest: SAELens's construction, replayed."""
    cfg = json.loads((FIXTURE / "model" / "synthetic_model_config.json").read_text())
    t = st.load(FIXTURE / "model" / "synthetic_model.safetensors")
    w = from_config(cfg)
    np.testing.assert_allclose(w.features_FxD, t["feature_vectors"], atol=1e-5)
    np.testing.assert_allclose(w.bias_D, t["bias"], atol=1e-6)
    np.testing.assert_allclose(w.probs_F, t["firing_probabilities"], rtol=1e-5)
    np.testing.assert_allclose(w.corr_FxR, saelens_world.corr_FxR, atol=1e-5)
    np.testing.assert_allclose(w.thresh_F, saelens_world.thresh_F, atol=1e-4)
    ours, theirs = jax.tree.flatten(w.levels), jax.tree.flatten(saelens_world.levels)
    assert ours[1] == theirs[1]  # the same structure and static runs
    for u, v in zip(ours[0], theirs[0]):
        np.testing.assert_array_equal(u, v)


def test_load_regenerates_what_is_missing(saelens_world, tmp_path):
    """Without hierarchy.json and the copula's tensors, SAELens's load regenerates both from the
    config (seed + 3, seed + 4); so does ours: the same world."""
    t = st.load(FIXTURE / "model" / "synthetic_model.safetensors")
    st.save(tmp_path / "synthetic_model.safetensors",
            {k: np.asarray(t[k]) for k in ("feature_vectors", "bias", "firing_probabilities")})
    (tmp_path / "synthetic_model_config.json").write_text(
        (FIXTURE / "model" / "synthetic_model_config.json").read_text())
    w = synth.load_saelens(tmp_path)
    for u, v in zip(jax.tree.leaves(w), jax.tree.leaves(saelens_world)):
        np.testing.assert_allclose(u, v, atol=1e-6)
    assert jax.tree.structure(w) == jax.tree.structure(saelens_world)


def test_hierarchy_is_saelens_modifier_exactly(saelens_world):
    """On fixed activations (make_synth_fixture.hierarchy_input: 128 x 391, 70% active), with
    the first active exclusive child winning, SAELens's modifier and `apply_hierarchy` give the
    same numbers: gating, scaling by a_q / mu_q compounded down the trees, exclusion at every
    level, in SAELens's order."""
    rs = np.random.RandomState(0)  # make_synth_fixture.hierarchy_input
    u, g = rs.random_sample((128, saelens_world.f)), rs.standard_normal((128, saelens_world.f))
    a = np.where(u < 0.7, np.maximum(4.5 + 1.5 * g, 0.0), 0.0).astype(np.float32)
    case = np.load(FIXTURE / "hierarchy_case.npz")
    want = np.zeros_like(a)
    want[case["rows"], case["cols"]] = case["vals"]
    first = [jnp.zeros((128, lv.sib_GxB.shape[0])) for lv in saelens_world.levels]
    got = np.asarray(synth.apply_hierarchy(saelens_world, jnp.asarray(a), first))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.sum(want > 0) < 0.5 * np.sum(a > 0)  # the hierarchy removed much


def test_firing_rates_match_saelens(our_stats, saelens_stats):
    p1, p2 = our_stats["rate_F"], saelens_stats["rate_F"]
    se = np.sqrt(p1 * (1 - p1) / our_stats["n"] + p2 * (1 - p2) / saelens_stats["n"])
    z = _z(p1, p2, se)
    assert z.max() < 5, (int(z.argmax()), p1[z.argmax()], p2[z.argmax()])
    assert np.mean(z ** 2) < 1.35, np.mean(z ** 2)


def test_l0_matches_saelens(our_stats, saelens_stats):
    a, b = our_stats["l0_mean"], saelens_stats["l0_mean"]
    se = np.sqrt(our_stats["l0_var"] / our_stats["n"] + saelens_stats["l0_var"] / saelens_stats["n"])
    assert abs(a / b - 1) < 0.02 and _z(a, b, se) < 5, (a, b, se)
    assert abs(np.sqrt(our_stats["l0_var"] / saelens_stats["l0_var"]) - 1) < 0.02


def test_magnitudes_when_active_match_saelens(our_stats, saelens_stats):
    k1, k2 = our_stats["count"], saelens_stats["rate_F"] * saelens_stats["n"]
    m1, m2 = our_stats["mag_mean_F"], saelens_stats["mag_mean_F"]
    se = np.sqrt(our_stats["mag_var_F"] / np.maximum(k1, 1) + saelens_stats["mag_var_F"] / np.maximum(k2, 1))
    seen = (k1 >= 30) & (k2 >= 30)
    assert seen.sum() > 350
    z = _z(m1, m2, se)[seen]
    assert z.max() < 5, z.max()
    often = (k1 >= 5000) & (k2 >= 5000)
    assert often.sum() > 20 and np.max(np.abs(m1[often] / m2[often] - 1)) < 0.02
    # the spread of a magnitude (std and parent scaling) too
    s1, s2 = np.sqrt(our_stats["mag_var_F"][often]), np.sqrt(saelens_stats["mag_var_F"][often])
    assert np.max(np.abs(s1 / s2 - 1)) < 0.05


def test_mean_of_x_matches_saelens(our_stats, saelens_stats):
    a, b = our_stats["x_mean_D"], saelens_stats["x_mean_D"]
    se = np.sqrt(our_stats["x_var_D"] / our_stats["n"] + saelens_stats["x_var_D"] / saelens_stats["n"])
    assert _z(a, b, se).max() < 5
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.02
    np.testing.assert_allclose(np.sqrt(our_stats["x_var_D"]), np.sqrt(saelens_stats["x_var_D"]), rtol=0.02)


def test_co_firing_matches_saelens(our_stats, saelens_stats):
    """Pairs among the 32 most frequent features: the copula, the trees (a child fires only
    with its parent) and mutual exclusion (siblings never together) shape these."""
    a, b = our_stats["cofire_KxK"], saelens_stats["cofire_KxK"]
    se = np.sqrt(a * (1 - a) / our_stats["n"] + b * (1 - b) / saelens_stats["n"])
    assert _z(a, b, se).max() < 5
    np.testing.assert_array_equal(a == 0, b == 0)  # exclusive siblings, both samplers


def test_hierarchy_and_exclusion_hold(our_stats, saelens_world):
    assert our_stats["viol"].tolist() == [0, 0]
    # not vacuous: the trees' children do fire
    leaves = np.asarray(saelens_world.levels[-1].feat_K)
    assert our_stats["count"][leaves].sum() > 10_000


def test_violations_are_counted(saelens_world):
    lv = saelens_world.levels[1]
    a = jnp.zeros((2, saelens_world.f)).at[0, lv.feat_K[0]].set(1.0)  # a child without its parent
    g = lv.sib_GxB[0]
    a = a.at[1, g[0]].set(1.0).at[1, g[1]].set(1.0).at[1, lv.gparent_G[0]].set(1.0)
    a = a.at[1, saelens_world.levels[0].parent_K[0]].set(1.0) if saelens_world.levels[0].feat_K.size else a
    orphans, exclusive = synth.hierarchy_violations(saelens_world, a)
    assert int(orphans) >= 1 and int(exclusive) == 1


def test_jit_determinism_and_x(saelens_world):
    f = jax.jit(synth.sample, static_argnums=2)
    x1, a1 = f(jax.random.PRNGKey(5), saelens_world, 256)
    x2, a2 = f(jax.random.PRNGKey(5), saelens_world, 256)
    x3, _ = f(jax.random.PRNGKey(6), saelens_world, 256)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(a1, a2)
    assert not np.allclose(x1, x3)
    assert x1.shape == (256, 40) and a1.shape == (256, 391)
    _, ae = synth.sample(jax.random.PRNGKey(5), saelens_world, 256)  # eager = jitted
    np.testing.assert_allclose(ae, a1, rtol=1e-5, atol=1e-5)
    w, b = np.asarray(saelens_world.features_FxD, np.float64), np.asarray(saelens_world.bias_D)
    np.testing.assert_allclose(x1, np.asarray(a1, np.float64) @ w + b, atol=1e-4)
    assert np.all(np.asarray(a1) >= 0)
    # inside a compiled scan, the world an argument (as the grid samples it): the same batches
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    scan = jax.jit(lambda w: jax.lax.scan(lambda c, k: (c, synth.sample(k, w, 64)[0]), 0, keys)[1])
    np.testing.assert_allclose(scan(saelens_world)[2], f(keys[2], saelens_world, 64)[0], rtol=1e-5, atol=1e-5)


def test_gathers_equal_slices(saelens_world):
    """A forest numbered in any order (index arrays, no runs) samples what the breadth-first
    numbering's slices sample."""
    runs = [lv.feat_run for lv in saelens_world.levels] + [lv.sib_run for lv in saelens_world.levels]
    assert sum(r is not None for r in runs) >= 4  # the fixture takes the slice paths
    plain = saelens_world.replace(levels=tuple(
        lv.replace(feat_run=None, parent_run=None, sib_run=None, gparent_run=None)
        for lv in saelens_world.levels))
    slots = saelens_world.slots
    assert sum(st.grp_parent_run is not None for st in slots.stages) >= 2  # the sampler's slices
    plain = plain.replace(slots=slots.replace(stages=tuple(
        st.replace(solo_run=None, solo_parent_run=None, grp_parent_run=None) for st in slots.stages)))
    f = jax.jit(synth.feature_acts, static_argnums=2)
    np.testing.assert_array_equal(f(jax.random.PRNGKey(2), saelens_world, 2048),
                                  f(jax.random.PRNGKey(2), plain, 2048))
    first = [jnp.zeros((64, lv.sib_GxB.shape[0])) for lv in saelens_world.levels]
    a = jax.random.uniform(jax.random.PRNGKey(3), (64, saelens_world.f)) * 5
    np.testing.assert_array_equal(synth.apply_hierarchy(saelens_world, a, first),
                                  synth.apply_hierarchy(plain, a, first))


def test_independent_features_rates_and_magnitudes():
    """No copula, no trees: f fires with p_f and its value is relu(mu_f + sigma_f g), whose
    mean given a_f > 0 is the truncated normal's mu + sigma phi(mu/sigma) / Phi(mu/sigma)."""
    from scipy.stats import norm
    f, d, n = 6, 4, 200_000
    p = np.array([0.5, 0.2, 0.05, 1.0, 0.0, 0.3])
    mu = np.array([1.0, 0.5, 2.0, 1.0, 1.0, 0.0])
    sd = np.array([0.0, 1.0, 0.5, 0.2, 1.0, 1.0])
    w = synth.make_world(np.eye(f, d), np.zeros(d), p, mu, sd)
    _, a = jax.jit(synth.sample, static_argnums=2)(jax.random.PRNGKey(0), w, n)
    a = np.asarray(a, np.float64)
    # P(a_f > 0) = p_f Phi(mu_f / sigma_f)
    want = p * np.where(sd > 0, norm.cdf(mu / np.maximum(sd, 1e-9)), 1.0)
    got = (a > 0).mean(0)
    assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9), (got, want)
    alpha = mu / np.maximum(sd, 1e-9)
    mean = np.where(sd > 0, mu + sd * norm.pdf(alpha) / norm.cdf(alpha), mu)
    for i in (0, 1, 2, 3, 5):
        v = a[a[:, i] > 0, i]
        assert abs(v.mean() - mean[i]) < 5 * max(v.std(), 1e-3) / np.sqrt(len(v)) + 1e-6, (i, v.mean(), mean[i])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="probs_F"):
        synth.make_world(np.eye(3), np.zeros(3), np.full(4, 0.1), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        synth.make_world(np.eye(3), np.zeros(3), np.full(3, 1.5), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="unknown preset"):
        synth.preset("synth-1m")
    with pytest.raises(ValueError, match="repeated"):
        synth.hierarchy_levels([{"feature_index": 0, "children": [{"feature_index": 0}]}], 3)


# ----------------------------------------------------------------------------------- presets
@functools.partial(jax.jit, static_argnums=(2, 3))
def _l0s(key, world, n_batches, batch):
    """L0 per sample and among the first F/4 features (Zipf order: the most frequent)."""
    def one(k):
        on = synth.feature_acts(k, world, batch) > 0
        return on.sum(1), on[:, : world.f // 4].sum(1), on.sum(0)
    l0, top, count = jax.lax.map(one, jax.random.split(key, n_batches))
    return l0.reshape(-1), top.reshape(-1), count.sum(0)


def _preset_reference(name: str) -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())["presets"][name]


def _check_l0(world, ref, n_batches, batch):
    l0, top, count = (np.asarray(v, np.float64) for v in _l0s(jax.random.PRNGKey(9), world, n_batches, batch))
    n = l0.size
    se = np.sqrt(l0.var() / n + ref["l0_var"] / ref["n"])
    assert abs(l0.mean() / ref["l0_mean"] - 1) < 0.02 and abs(l0.mean() - ref["l0_mean"]) < 5 * se, (l0.mean(), ref)
    se = np.sqrt(top.var() / n + ref["top_var"] / ref["n"])
    assert abs(top.mean() - ref["top_mean"]) < 5 * se, (top.mean(), ref)
    return l0.mean(), top.mean(), count / n


def test_synth_small_preset_is_saelens_configuration():
    """synth-small: SynthSAEBench-16k's configuration at 4,096 x 256; its L0 (all features and
    the first quarter) matches SAELens's generator on the same configuration and seed
    (meta.json, from make_synth_fixture.py)."""
    w = synth.preset("synth-small")
    assert w.features_FxD.shape == (4096, 256) and w.correlated and len(w.levels) == 4
    np.testing.assert_allclose(np.linalg.norm(w.features_FxD, axis=1), 1.0, atol=1e-5)
    rate = _check_l0(w, _preset_reference("synth-small"), 50, 1024)[2]
    base = firing_probabilities(preset_config("synth-small")["firing_probability"], 4096, 42)
    assert rate[0] == pytest.approx(base[0], abs=0.01)  # a root: no compensation
    cfg = preset_config("synth-small", seed=3)
    assert cfg["seed"] == 3 and preset_config("synth-small")["seed"] == 42


def test_orthogonalisation_lowers_its_loss():
    cfg = {**preset_config("synth-small"), "num_features": 512, "hidden_dim": 32,
           "hierarchy": None, "correlation": None}
    w0 = np.asarray(from_config(cfg, orthogonalize=False).features_FxD, np.float64)
    w1 = np.asarray(from_config({**cfg, "orthogonalization": {"num_steps": 100, "lr": 3e-3}}).features_FxD,
                    np.float64)

    def loss(w):
        g = w @ w.T
        return np.sum((g - np.diag(np.diag(g))) ** 2)

    assert loss(w1) < 0.97 * loss(w0)
    np.testing.assert_allclose(np.linalg.norm(w1, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_synth_16k_statistics():
    """SynthSAEBench-16k's documented statistics: L0 about 34, about 25 among the 4,096 most
    frequent features; and SAELens's generator's on the same configuration. The dictionary is
    not orthogonalised here (nothing but W depends on it)."""
    w = synth.preset("synth-16k", orthogonalize=False)
    l0, top, rate = _check_l0(w, _preset_reference("synth-16k"), 10, 1024)
    assert 33 < l0 < 36 and 24 < top < 26.5, (l0, top)
    assert np.sort(rate)[::-1][:4096].sum() == pytest.approx(top, rel=0.03)


def test_exclusive_groups_and_gating_are_exact_on_a_small_forest():
    """The sampler's closed form for an exclusive group (one word per group: the winner and its
    truncated normal) against the enumerated answer, with padding (groups of 3 and 2), a group
    under a node without a feature (always live), a non-exclusive child and a free feature:
    P(child c is active) = P(parent active) p_c r_c E[1 / (1 + K_c)], r = Phi(mu / sigma),
    K_c the other children active before the exclusion; a winner's value given it is active is
    the truncated normal's mean."""
    import itertools

    from scipy.stats import norm
    p = np.array([0.6, 0.5, 0.3, 0.2, 0.5, 0.4, 0.3, 0.6, 0.2])
    mu, sd = np.full(9, 2.0), np.full(9, 1.0)
    leaf = lambda i: {"feature_index": i, "children": []}
    roots = [{"feature_index": 0, "mutually_exclusive_children": True, "children": [
                 {"feature_index": 1, "children": [leaf(4), leaf(5)]}, leaf(2), leaf(3)]},
             {"feature_index": None, "mutually_exclusive_children": True, "children": [leaf(6), leaf(7)]}]
    w = synth.make_world(np.eye(9, 4), np.zeros(4), p, mu, sd, roots=roots)
    assert w.slots.groups == 2 and w.slots.width == 3 and w.slots.solo == 4
    n = 400_000
    _, a = jax.jit(synth.sample, static_argnums=2)(jax.random.PRNGKey(11), w, n)
    on = np.asarray(a) > 0
    r = norm.cdf(2.0)

    def wins(qs):  # P(child c wins) for independent q'_c, enumerated
        out = np.zeros(len(qs))
        for act in itertools.product([0, 1], repeat=len(qs)):
            pr = np.prod([q if x else 1 - q for q, x in zip(qs, act)])
            for c in np.flatnonzero(act):
                out[c] += pr / sum(act)
        return out

    want = np.zeros(9)
    want[0], want[8] = p[0] * r, p[8] * r
    want[[1, 2, 3]] = want[0] * wins(p[[1, 2, 3]] * r)
    want[[6, 7]] = wins(p[[6, 7]] * r)
    want[[4, 5]] = want[1] * p[[4, 5]] * r
    got = on.mean(0)
    assert np.all(np.abs(got - want) < 5 * np.sqrt(want * (1 - want) / n)), (got, want)
    assert on[:, [1, 2, 3]].sum(1).max() == 1 and on[:, [6, 7]].sum(1).max() == 1
    assert not np.any(on[:, [1, 2, 3]].any(1) & ~on[:, 0]) and not np.any(on[:, 4] & ~on[:, 1])
    mean = 2.0 + norm.pdf(2.0) / norm.cdf(2.0)  # given active, unscaled
    for i in (6, 2, 4):
        v = np.asarray(a)[on[:, i], i]
        assert abs(v.mean() - mean) < 5 * v.std() / np.sqrt(len(v)), (i, v.mean(), mean)


def _forest_world() -> synth.SynthWorld:
    """9 features in 4 dimensions under a small forest with padding (exclusive groups of 3 and 2), a
    group under a node without a feature (always live), a non-exclusive child and a free feature,
    and a rank-2 copula."""
    rng = np.random.default_rng(4)
    p = np.array([0.6, 0.5, 0.3, 0.2, 0.5, 0.4, 0.3, 0.6, 0.2])
    leaf = lambda i: {"feature_index": i, "children": []}  # noqa: E731
    roots = [{"feature_index": 0, "mutually_exclusive_children": True, "children": [
                 {"feature_index": 1, "children": [leaf(4), leaf(5)]}, leaf(2), leaf(3)]},
             {"feature_index": None, "mutually_exclusive_children": True, "children": [leaf(6), leaf(7)]}]
    lf = rng.normal(size=(9, 2)) * 0.5
    return synth.make_world(np.eye(9, 4), np.zeros(4), p, np.full(9, 2.0), np.full(9, 1.0), lf,
                            1.0 + (lf ** 2).sum(1), roots=roots)


@pytest.mark.parametrize("which", ["saelens", "saelens_uncorrelated", "forest"])
def test_native_sampler_gives_xla_samples(which, saelens_world):
    """The sampler through the native kernels (q and Phi^-1 only where u may be under q, no
    winner drawn under an inactive parent, x from V's nonzeros' rows of W) against its XLA
    formulation on the same words: the same active features, their values and x to float
    rounding (erfc is the C library's in one and XLA's in the other: where u / q is near 1, a few
    ulps of q move Phi^-1 further)."""
    world = {"saelens": saelens_world, "saelens_uncorrelated": saelens_world.replace(correlated=False),
             "forest": _forest_world()}[which]
    f = lambda: jax.jit(synth.sample, static_argnums=2)(jax.random.PRNGKey(9), world, 4096)  # noqa: E731
    x_native, a_native = (np.asarray(v) for v in f())
    with native.kernels(False):
        x_xla, a_xla = (np.asarray(v) for v in f())
    on = a_xla > 0
    assert on.sum() > 4000
    assert np.mean((a_native > 0) != on) < 1e-5
    both = on & (a_native > 0)
    rel = np.abs(a_native[both] - a_xla[both]) / a_xla[both]
    assert np.median(rel) < 1e-6 and rel.max() < 1e-2, (np.median(rel), rel.max())
    rows = np.all(np.isclose(x_native, x_xla, rtol=1e-4, atol=1e-4), axis=1)
    assert rows.mean() > 0.999, rows.mean()


def test_sampler_traces_where_jax_has_other_backends(monkeypatch):
    """Where jax has a backend besides the CPU, `native.on_cpu` traces the native kernels and XLA's
    formulation side by side (lax.platform_dependent, whose branches take traced arguments): the
    sampler traces there too, and on the CPU samples what it samples on a CPU-only jax."""
    world = _forest_world()
    f = lambda: np.asarray(jax.jit(synth.sample, static_argnums=2)(jax.random.PRNGKey(3), world, 256)[1])  # noqa: E731
    want = f()
    monkeypatch.setattr(native, "cpu_only", lambda: False)
    jax.clear_caches()
    try:
        np.testing.assert_array_equal(f(), want)
    finally:
        jax.clear_caches()
