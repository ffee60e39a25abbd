"""The selector study's world draws and scoring (experiments/selector_study.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import selector_study  # noqa: E402


def test_worlds_are_drawn_from_the_seed_within_the_stated_ranges():
    a, b = selector_study.draw_worlds(1414, 12), selector_study.draw_worlds(1414, 12)
    assert a == b and a != selector_study.draw_worlds(7, 12)
    for w in a:
        assert w["d"] == 32 and w["features"] / w["d"] in (1.5, 2.0, 3.0)
        assert 0.03 <= w["mean_active"] / w["d"] <= 0.09 + 1e-9
        assert 0 <= w["corr_strength"] <= 1 and (w["noise"] == 0 or 0.002 <= w["noise"] <= 0.02)
        assert ("zipf" in w) != ("decay" in w)
    assert sum("zipf" in w for w in a) == 6


def _results(mmcs, dead, larger, ssll):
    l1, ratios = [0.1, 0.3, 1.0], [0.5, 1.0, 2.0]
    cells = [{"l1": a, "ratio": r, "diverged": False, "mmcs": mmcs[i][j], "dead": dead[i][j],
              "mmcs_with_larger": larger[i][j], "ssll": ssll[i][j], "l0": 1.0, "fvu": 0.1}
             for i, a in enumerate(l1) for j, r in enumerate(ratios)]
    return {"cells": cells}


def test_regret_and_ratio_hit_are_read_off_the_chosen_cells():
    mmcs = [[0.5, 0.6, 0.7], [0.8, 0.95, 0.99], [0.6, 0.9, 0.97]]
    dead = [[0, 0, 0], [0, 0, 3], [2, 4, 6]]
    larger = [[0.5, 0.5, None], [0.9, 0.6, None], [0.4, 0.5, None]]
    ssll = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    row = selector_study.score(selector_study.planes(_results(mmcs, dead, larger, ssll)))
    assert row["best_mmcs"] == 0.99 and (row["best_ratio"], row["best_l1"]) == (2.0, 0.3)
    # Dead latents: largest dead-free ratio 2, at its largest dead-free alpha 0.1.
    assert row["dead_latents"]["regret"] == pytest.approx(0.99 - 0.7)
    # SSLL: the smallest ratio with an interior peak is 0.5 (alpha 0.3): two steps from 2.
    assert row["ssll"]["regret"] == pytest.approx(0.99 - 0.8) and not row["ssll"]["ratio_hit"]
    # Ridge: ratio 0.5, alpha 0.3. Combined: ratio 2 (dead latents), alpha carried from ratio 1's
    # ridge peak 0.3 at equal penalty per latent, 0.3 x 2 = 0.6, nearest grid alpha 1.0.
    assert (row["mmcs_with_larger"]["ratio"], row["mmcs_with_larger"]["l1"]) == (0.5, 0.3)
    assert (row["combined"]["ratio"], row["combined"]["l1"]) == (2.0, 1.0)
    assert row["combined"]["regret"] == pytest.approx(0.99 - 0.97) and row["combined"]["ratio_hit"]
    # combined_dead_free: the same ratio, alpha moved to its dead-free cell nearest alpha 1.0: 0.1
    assert (row["combined_dead_free"]["ratio"], row["combined_dead_free"]["l1"]) == (2.0, 0.1)
    assert row["combined_dead_free"]["dead"] == 0
    # The bound: the best cell that is dead-free or at a ratio with no dead-free cell: ratio 1,
    # alpha 0.3 (0.95); with every cell of ratio 2 dead, the grid's best (2, 0.3) itself.
    assert (row["bound_dead_free"]["ratio"], row["bound_dead_free"]["l1"]) == (1.0, 0.3)
    assert row["bound_dead_free"]["regret"] == pytest.approx(0.99 - 0.95)
    dead[0][2] = 1
    row = selector_study.score(selector_study.planes(_results(mmcs, dead, larger, ssll)))
    assert (row["bound_dead_free"]["ratio"], row["bound_dead_free"]["l1"], row["bound_dead_free"]["regret"]) == (
        2.0, 0.3, 0.0)


def test_topk_worlds_get_a_k_axis_and_the_live_latent_ratio():
    """--arch topk: k = 1-4x the world's mean active features, read from dense to sparse; the
    combined rule takes its ratio from the live latents (the largest dictionary keeps 0.45 of
    its latents alive: 0.9 x features -> ratio 1), combined_dead from the dead latents (ratio
    0.5, the only dead-free one), and both take k from the MMCS-with-larger ridge at their ratio."""
    assert selector_study.k_grid(1.4) == [1, 2, 3, 4, 6] and selector_study.k_grid(3.0) == [3, 4, 6, 9, 12]
    ks, ratios = [2, 4, 8], [0.5, 1.0, 2.0]
    mmcs = {(k, r): 0.5 + 0.1 * r + 0.01 * k for k in ks for r in ratios}
    larger = {(2, 0.5): 0.9, (4, 0.5): 0.8, (8, 0.5): 0.7, (2, 1.0): 0.6, (4, 1.0): 0.95, (8, 1.0): 0.7}
    cells = [{"arch": "topk", "k": k, "l1": 0.0, "ratio": r, "diverged": False, "mmcs": mmcs[k, r],
              "dead": 0 if r == 0.5 else 5, "mmcs_with_larger": larger.get((k, r)), "ssll": 0.0,
              "l0": float(k), "fvu": 0.1, "frac_alive": 0.45 if r == 2.0 else 0.99}
             for k in ks for r in ratios]
    p = selector_study.planes({"cells": cells})
    assert p["l1_axis"] == [8, 4, 2] and p["fixed_l0"]
    row = selector_study.score(p)
    assert (row["combined"]["ratio"], row["combined"]["l1"]) == (1.0, 4)
    assert (row["combined_dead"]["ratio"], row["combined_dead"]["l1"]) == (0.5, 2)
    assert row["combined"]["regret"] == pytest.approx(mmcs[8, 2.0] - mmcs[4, 1.0])
