"""Choosing (ratio, alpha) without ground truth, on synthetic planes with known answers."""

import numpy as np

from sae_jax import selection

L1 = [0.01, 0.03, 0.1, 0.3, 1.0]  # rows (alpha ascending)
RATIOS = [0.5, 1.0, 2.0, 4.0]  # columns (dictionary size ascending)
NAN = np.nan


def _dead(zero_cols: dict[int, int]) -> np.ndarray:
    """Dead counts: column j is dead-free for alpha rows 0..zero_cols[j] and dead above;
    other columns have dead latents everywhere."""
    dead = np.full((len(L1), len(RATIOS)), 5.0)
    for j, top in zero_cols.items():
        dead[: top + 1, j] = 0
    return dead


def _ssll(peaks: dict[int, int]) -> np.ndarray:
    """SSLL: column j peaks at row peaks[j]; other columns rise monotonically (edge maximum)."""
    rows = np.arange(len(L1), dtype=float)[:, None]
    out = np.repeat(rows, len(RATIOS), axis=1)
    for j, i in peaks.items():
        out[:, j] = -np.abs(rows[:, 0] - i)
    return out


def _larger(i: int, j: int) -> np.ndarray:
    """MMCS with larger: maximum at (i, j); NaN for the largest size, as mmcs_with_larger gives."""
    out = np.full((len(L1), len(RATIOS)), 0.5)
    out[i, j] = 0.9
    out[:, -1] = NAN
    return out


def test_dead_latents_largest_dead_free_ratio_then_largest_alpha():
    pick = selection.by_dead_latents(_dead({0: 4, 1: 2, 2: 0}), L1, RATIOS)
    assert (pick["ratio"], pick["l1"]) == (2.0, 0.01)
    pick = selection.by_dead_latents(_dead({0: 4, 1: 2}), L1, RATIOS)
    assert (pick["ratio"], pick["l1"]) == (1.0, 0.1)
    # NaN (no data) is not "no dead latents".
    dead = _dead({0: 4, 1: 2})
    dead[:, 3] = NAN
    assert selection.by_dead_latents(dead, L1, RATIOS)["ratio"] == 1.0
    assert selection.by_dead_latents(np.ones((5, 4)), L1, RATIOS)["ratio"] is None


def test_ssll_smallest_ratio_with_interior_peak():
    pick = selection.by_ssll(_ssll({1: 2, 2: 3}), L1, RATIOS)
    assert (pick["ratio"], pick["l1"]) == (1.0, 0.1)
    # Peaks at the edges of the alpha range do not count.
    edge = _ssll({0: 0, 1: 4, 3: 1})
    assert selection.by_ssll(edge, L1, RATIOS)["ratio"] == 4.0
    assert selection.by_ssll(_ssll({}), L1, RATIOS)["ratio"] is None


def test_ssll_interior_is_judged_over_finite_entries():
    plane = _ssll({})
    plane[:, 0] = [NAN, 5.0, 3.0, 1.0, NAN]  # maximum at the first finite alpha: an edge
    plane[:, 1] = [NAN, 1.0, NAN, 1.0, NAN]  # fewer than 3 finite values: skipped
    plane[:, 2] = [NAN, 1.0, 3.0, 2.0, NAN]  # interior peak at alpha 0.1
    pick = selection.by_ssll(plane, L1, RATIOS)
    assert (pick["ratio"], pick["l1"]) == (2.0, 0.1)


def test_mmcs_with_larger_takes_the_maximum_ignoring_nan():
    pick = selection.by_mmcs_with_larger(_larger(3, 1), L1, RATIOS)
    assert (pick["ratio"], pick["l1"]) == (1.0, 0.3)
    assert selection.by_mmcs_with_larger(np.full((5, 4), NAN), L1, RATIOS)["ratio"] is None


def test_all_methods_agree():
    out = selection.suggest(_dead({0: 4, 1: 3}), _ssll({1: 2, 2: 3}), _larger(3, 1), L1, RATIOS)
    assert [m["ratio"] for m in out["methods"]] == [1.0, 1.0, 1.0]
    assert [m["l1"] for m in out["methods"]] == [0.3, 0.1, 0.3]
    # The ratio all agree on; alpha where the MMCS-with-larger ridge peaks at that ratio.
    assert (out["ratio"], out["l1"]) == (1.0, 0.3)
    assert out["agree"] == ["dead_latents", "ssll", "mmcs_with_larger"]
    assert out["disagree"] == []
    assert "all methods agree" in out["summary"]


def test_the_ratio_comes_from_dead_latents_even_when_the_others_agree_on_another():
    out = selection.suggest(_dead({0: 4, 1: 4, 2: 1}), _ssll({1: 2}), _larger(4, 1), L1, RATIOS)
    assert [m["ratio"] for m in out["methods"]] == [2.0, 1.0, 1.0]
    larger_at_2 = _larger(4, 1)[:, 2]
    assert (out["ratio"], out["l1"]) == (2.0, L1[int(np.nanargmax(larger_at_2))])
    assert out["agree"] == ["dead_latents"]
    assert out["disagree"] == ["ssll", "mmcs_with_larger"]
    assert "ssll, mmcs_with_larger suggest other ratios" in out["summary"]


def test_without_dead_latent_answer_the_majority_ratio_is_used():
    out = selection.suggest(np.ones((5, 4)), _ssll({1: 2}), _larger(4, 1), L1, RATIOS)
    assert (out["ratio"], out["l1"]) == (1.0, 1.0)
    assert out["agree"] == ["ssll", "mmcs_with_larger"]


def test_without_a_majority_the_dead_latent_ratio_and_the_ridge_alpha_are_combined():
    larger = _larger(3, 0)  # the global ridge is at ratio 0.5 ...
    larger[2, 2] = 0.8  # ... and at ratio 2 the ridge peaks at alpha 0.1
    out = selection.suggest(_dead({0: 4, 2: 2}), _ssll({1: 2}), larger, L1, RATIOS)
    assert [m["ratio"] for m in out["methods"]] == [2.0, 1.0, 0.5]
    assert (out["ratio"], out["l1"]) == (2.0, 0.1)
    assert out["agree"] == ["dead_latents"]
    assert out["disagree"] == ["ssll", "mmcs_with_larger"]
    assert "MMCS-with-larger ridge" in out["summary"]


def test_largest_ratio_has_no_ridge_so_alpha_is_carried_from_the_next_smaller_ratio():
    """Ridge peak alpha 0.03 at ratio 2, carried to ratio 4 at the same penalty per latent:
    0.03 x (4/2)^p, snapped to the grid in log alpha (p = 1: report convention; p = 0: sum)."""
    out = selection.suggest(_dead({3: 2}), _ssll({}), _larger(1, 2), L1, RATIOS)
    assert (out["ratio"], out["l1"]) == (4.0, 0.1)  # 0.06 is nearer 0.1 than 0.03 in log
    assert "ridge at ratio 2, carried to ratio 4" in out["summary"]
    out = selection.suggest(_dead({3: 1}), _ssll({}), _larger(1, 2), L1, RATIOS, size_exponent=0)
    assert (out["ratio"], out["l1"]) == (4.0, 0.03)
    # With no ridge anywhere (one dictionary size per alpha), alpha is the dead-latent one.
    out = selection.suggest(_dead({3: 1}), _ssll({}), np.full((5, 4), NAN), L1, RATIOS)
    assert (out["ratio"], out["l1"]) == (4.0, 0.03)
    assert "alpha from dead_latents" in out["summary"]


def test_ssll_ignores_a_peak_without_prominence():
    plane = _ssll({1: 2})
    plane[:, 0] = [1.40, 1.41, 1.42, 1.39, -1.0]  # a 0.02 bump on a plateau: not a peak
    assert selection.by_ssll(plane, L1, RATIOS)["ratio"] == 1.0


def test_missing_methods_do_not_vote():
    out = selection.suggest(np.full((5, 4), NAN), _ssll({}), _larger(2, 0), L1, RATIOS)
    assert [m["ratio"] for m in out["methods"]] == [None, None, 0.5]
    assert (out["ratio"], out["l1"]) == (0.5, 0.1)
    assert out["agree"] == ["mmcs_with_larger"]
    assert out["disagree"] == ["dead_latents", "ssll"]
    # the summary says they were silent, not that they named another ratio
    assert "dead_latents, ssll name no ratio" in out["summary"] and "other ratios" not in out["summary"]


def test_zero_alpha_is_kept_when_it_is_the_only_choice():
    axis = [0.0, 0.1]
    out = selection.suggest(np.zeros((2, 1)), np.full((2, 1), NAN), np.full((2, 1), NAN),
                            axis, [1.0])
    assert (out["ratio"], out["l1"]) == (1.0, 0.1)  # dead-free: largest alpha
    out = selection.suggest(np.array([[0.0], [3.0]]), np.full((2, 1), NAN),
                            np.full((2, 1), NAN), axis, [1.0])
    assert (out["ratio"], out["l1"]) == (1.0, 0.0)


def test_all_nan_planes_give_no_suggestion():
    nan = np.full((5, 4), NAN)
    out = selection.suggest(nan, nan, nan, L1, RATIOS)
    assert out["ratio"] is None and out["l1"] is None
    assert out["agree"] == []
    assert [m["ratio"] for m in out["methods"]] == [None, None, None]
    assert all(m["why"] for m in out["methods"])
    assert "no method" in out["summary"]


def _alive(at_largest: list[float]) -> np.ndarray:
    """Fraction of latents alive: every cell 1 except the largest ratio's, given per row."""
    out = np.ones((len(L1), len(RATIOS)))
    out[:, -1] = at_largest
    return out


def test_live_latents_smallest_ratio_holding_the_largest_dictionarys_live_latents():
    """Ratio 4 keeps at most 0.6 of its latents alive = 2.4 x features: the smallest ratio with
    at least that many latents is 4; at 0.45 (1.8 x) it is 2; a fully used largest dictionary
    names itself; NaN columns (no cells) are skipped."""
    pick = selection.by_live_latents(_alive([0.2, 0.45, 0.3, 0.1, 0.1]), L1, RATIOS)
    assert pick["ratio"] == 2.0 and pick["l1"] is None and "(ratio 1.8)" in pick["why"]
    assert selection.by_live_latents(_alive([0.6, 0.1, 0.1, 0.1, 0.1]), L1, RATIOS)["ratio"] == 4.0
    assert selection.by_live_latents(_alive([1.0] * 5), L1, RATIOS)["ratio"] == 4.0
    alive = _alive([0.2] * 5)  # 0.8 x: ratio 1
    assert selection.by_live_latents(alive, L1, RATIOS)["ratio"] == 1.0
    alive[:, 0] = NAN
    assert selection.by_live_latents(alive, L1, RATIOS)["ratio"] == 1.0
    assert selection.by_live_latents(alive[:, :1], L1, RATIOS[:1])["ratio"] is None


def test_fixed_l0_takes_the_ratio_from_live_latents_and_k_from_the_ridge():
    """With alive given (TopK, BatchTopK), the live-latent ratio replaces the dead-latent one,
    and the setting is the MMCS-with-larger ridge's at that ratio."""
    larger = _larger(1, 1)  # the global ridge: ratio 1 ...
    larger[3, 2] = 0.8  # ... at ratio 2 it peaks at row 3
    dead = _dead({0: 4})  # the dead-latent method: ratio 0.5
    out = selection.suggest(dead, _ssll({}), larger, L1, RATIOS, size_exponent=0,
                            alive_AxR=_alive([0.45] * 5))
    assert (out["ratio"], out["l1"]) == (2.0, 0.3)
    assert out["methods"][0]["method"] == "live_latents" and out["agree"] == ["live_latents"]
    assert (selection.suggest(dead, _ssll({}), larger, L1, RATIOS, size_exponent=0)["ratio"]) == 0.5
    # the largest ratio has no ridge: the setting is carried from the next smaller ratio's
    out = selection.suggest(dead, _ssll({}), larger, L1, RATIOS, size_exponent=0, alive_AxR=_alive([0.9] * 5))
    assert (out["ratio"], out["l1"]) == (4.0, 0.3)


def test_results_analyse_reads_topk_cells_with_the_live_latent_ratio():
    """results.analyse on a finished TopK grid: the live-latent method comes first and sets the
    ratio (the largest dictionary, 64 latents at ratio 2, keeps 0.4 alive: 0.8 x features ->
    ratio 1); a relu_l1 grid with the same numbers has no live-latent method."""
    from sae_jax import results

    rng = np.random.default_rng(0)
    cells, dicts = [], []
    for arch in ("topk", "relu_l1"):
        for s in (2, 4):
            for ratio in (0.5, 1.0, 2.0):
                m = int(32 * ratio)
                dicts.append(rng.standard_normal((m, 8)))
                cells.append({"index": len(cells), "arch": arch, "k": s, "l1": float(s), "ratio": ratio,
                              "dict_size": m, "seed": 0, "noise": 0.0, "diverged": False,
                              "mmcs": 0.5 + 0.1 * ratio, "dead": 3, "recon_loss": 1.0 / s,
                              "l1_loss": float(s), "frac_alive": 0.4 if ratio == 2.0 else 1.0})
    out = results.analyse(cells, dicts)
    topk, l1 = out["by_arch"]["topk"]["suggested"], out["by_arch"]["relu_l1"]["suggested"]
    assert topk["methods"][0]["method"] == "live_latents" and topk["ratio"] == 1.0
    assert "live_latents" in topk["summary"] and topk["k"] in (2, 4)
    assert [m["method"] for m in l1["methods"]] == ["dead_latents", "ssll", "mmcs_with_larger"]


def test_dead_consistent_alpha_never_lands_on_a_dead_cell_when_the_ratio_has_a_dead_free_one():
    """With dead_consistent: the ridge at the chosen ratio peaks at alpha 1 where the penalty
    killed latents; the suggestion takes the dead-free alpha nearest to it (0.3), and says so."""
    larger = _larger(4, 1)  # the ridge at ratio 1: alpha 1
    dead = _dead({1: 3})  # ratio 1 is dead-free up to alpha 0.3; larger ratios dead everywhere
    out = selection.suggest(dead, _ssll({}), larger, L1, RATIOS, dead_consistent=True)
    assert (out["ratio"], out["l1"]) == (1.0, 0.3)
    assert "moved to alpha 0.3, the nearest without dead latents" in out["summary"]
    # a dead cell below the dead-free band (dead at alpha 0.01 only): the nearest dead-free alpha above
    dead = np.full((5, 4), 5.0)
    dead[1:, 1] = 0
    out = selection.suggest(dead, _ssll({}), _larger(0, 1), L1, RATIOS, dead_consistent=True)
    assert (out["ratio"], out["l1"]) == (1.0, 0.03)
    # a ridge cell without dead latents stays where it is
    out = selection.suggest(_dead({1: 3}), _ssll({}), _larger(2, 1), L1, RATIOS, dead_consistent=True)
    assert (out["ratio"], out["l1"]) == (1.0, 0.1) and "moved" not in out["summary"]
    # fixed-L0 grids (TopK): dead latents there are rare features, not a penalty; k stays the ridge's
    fixed = selection.suggest(_dead({1: 3}), _ssll({}), larger, L1, RATIOS, size_exponent=0,
                              alive_AxR=_alive([0.25] * 5), dead_consistent=True)
    assert fixed["ratio"] == 1.0 and fixed["l1"] == 1.0 and "moved" not in fixed["summary"]
    # the default keeps the ridge's alpha
    assert selection.suggest(_dead({1: 3}), _ssll({}), larger, L1, RATIOS)["l1"] == 1.0
