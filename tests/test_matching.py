"""One-to-one matching metrics against brute force over every injective assignment."""

import itertools

import numpy as np
import pytest

from sae_jax import matching


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _brute(learned, ref, threshold=0.9):
    """Best total cosine over every one-to-one assignment; its MCC and recovered share."""
    sim = _unit(ref) @ _unit(learned).T
    n, m = sim.shape
    best, best_cos = -np.inf, None
    if n <= m:
        for perm in itertools.permutations(range(m), n):
            cos = sim[np.arange(n), perm]
            if cos.sum() > best:
                best, best_cos = cos.sum(), cos
    else:
        for perm in itertools.permutations(range(n), m):
            cos = sim[perm, np.arange(m)]
            if cos.sum() > best:
                best, best_cos = cos.sum(), cos
    return best / n, np.sum(best_cos > threshold) / n


@pytest.mark.parametrize("n,m", [(4, 4), (4, 7), (6, 3), (5, 5)])
def test_hungarian_matches_brute_force(rng, n, m):
    for _ in range(5):
        ref = rng.normal(size=(n, 6))
        # Learned rows: noisy copies of some reference rows plus random ones.
        learned = rng.normal(size=(m, 6))
        k = min(n, m) - 1
        learned[:k] = ref[rng.permutation(n)[:k]] + 0.2 * rng.normal(size=(k, 6))
        mcc, rec = _brute(learned, ref)
        got = matching.matching_metrics(learned, ref)
        assert got["matching"] == "hungarian"
        assert got["mcc"] == pytest.approx(mcc, abs=1e-5)
        assert got["recovered"] == pytest.approx(rec)
        h = matching.hungarian_match(learned, ref)
        assert len(set(h.learned)) == len(h.learned) == min(n, m)


def test_greedy_is_one_to_one_never_beats_hungarian_and_agrees_when_features_are_clear(rng):
    ref = rng.normal(size=(40, 16))
    learned = np.concatenate([ref[rng.permutation(40)] + 0.05 * rng.normal(size=(40, 16)),
                              rng.normal(size=(20, 16))])
    h = matching.hungarian_match(learned, ref)
    for block in (1, 7, 1024):  # the blocking does not change the answer
        g = matching.greedy_match(learned, ref, block=block)
        assert len(set(g.learned)) == len(g.learned) == 40
        assert g.cos.sum() <= h.cos.sum() + 1e-4
        assert g.cos.sum() == pytest.approx(h.cos.sum(), abs=1e-4)
    # Ambiguous rows: greedy may lose to the optimum, never win.
    amb = rng.normal(size=(12, 4))
    lat = rng.normal(size=(10, 4))
    best = matching.hungarian_match(lat, amb).cos.sum()
    for block in (3, 64):
        g = matching.greedy_match(lat, amb, block=block)
        assert len(g.cos) == 10 and len(set(g.learned)) == 10
        assert g.cos.sum() <= best + 1e-5


def test_greedy_takes_over_past_the_size_limit(rng, monkeypatch):
    ref, learned = rng.normal(size=(8, 5)), rng.normal(size=(9, 5))
    monkeypatch.setattr(matching, "HUNGARIAN_MAX_ENTRIES", 8 * 9 - 1)
    assert matching.matching_metrics(learned, ref)["matching"] == "greedy"
    monkeypatch.setattr(matching, "HUNGARIAN_MAX_ENTRIES", 8 * 9)
    assert matching.matching_metrics(learned, ref)["matching"] == "hungarian"


def test_redundancy_counts_unmatched_near_copies(rng):
    ref = _unit(rng.normal(size=(10, 32)))
    copies = ref[:3] + 0.01 * rng.normal(size=(3, 32))  # duplicates of matched latents
    far = rng.normal(size=(5, 32))  # unmatched but unlike any matched latent
    learned = np.concatenate([ref + 0.01 * rng.normal(size=ref.shape), copies, far])
    got = matching.matching_metrics(learned, ref)
    assert got["mcc"] > 0.99 and got["recovered"] == 1.0
    assert got["redundant"] == 3
    # Brute force: unmatched latents whose max cosine with a matched one exceeds 0.9.
    m = matching.hungarian_match(learned, ref)
    u = _unit(learned)
    free = np.setdiff1d(np.arange(len(learned)), m.learned)
    assert np.sum((u[free] @ u[m.learned].T).max(1) > 0.9) == got["redundant"]


def test_metrics_are_invariant_to_permuting_the_learned_rows(rng):
    ref, learned = rng.normal(size=(6, 8)), rng.normal(size=(9, 8))
    a = matching.matching_metrics(learned, ref)
    b = matching.matching_metrics(learned[rng.permutation(9)], ref)
    assert a["mcc"] == pytest.approx(b["mcc"], abs=1e-6) and a["redundant"] == b["redundant"]


def test_toy_run_records_matching_per_cell_and_in_the_report(tmp_path):
    import json

    from sae_jax import cli, report

    out = tmp_path / "run"
    assert cli.main(["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--steps", "50",
                     "--l1", "0.03,0.3", "--ratios", "0.5,2", "--no-figures", "--no-progress",
                     "--checkpoint-every", "0", "--eval-samples", "64", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    with np.load(out / "dictionaries.npz") as z:
        gt = z["ground_truth"]
        for c in res["cells"]:
            want = matching.matching_metrics(z[f"decoder_{c['index']}"], gt)
            assert c["mcc"] == pytest.approx(want["mcc"], abs=1e-6)
            assert (c["recovered"], c["redundant"]) == (want["recovered"], want["redundant"])
            assert c["mcc"] <= c["mmcs"] + 1e-5  # a matched cosine never beats the best one
    text = open(report.write(str(out), res, {}, "t")).read()
    assert "| MCC | recovered | redundant |" in text
