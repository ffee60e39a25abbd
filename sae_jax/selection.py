"""Choosing (dictionary ratio, alpha) from a finished grid without ground truth.

The report's three methods, each read off the (alpha x ratio) plane:

- dead latents: the largest dictionary, then the largest alpha, whose cells have no dead latent;
- loss stickiness: SSLL = z(log recon) + z(log L1) has an interior peak along alpha only where
  the dictionary is large enough; take the smallest ratio with a clear peak (at least
  `min_prominence` above both ends of its curve), at its peak alpha;
- MMCS with larger dictionaries: the ridge, i.e. the cell where a dictionary agrees best with
  the larger dictionaries trained at the same alpha.

The combined suggestion uses each method where it is strongest: the ratio is the dead-latent
method's, and alpha is where the MMCS-with-larger ridge peaks at that ratio. The largest
dictionary has no larger one to compare with, so there alpha is the ridge's peak alpha at the
next smaller ratio r' that has a ridge, carried to ratio r at the same penalty per latent:
alpha = alpha' (r / r')^p, snapped to the nearest grid alpha in log scale, with p = 1 for the
report's L1 convention (alpha ||c||_1 / m: the penalty per latent is alpha / m) and p = 0 for
`sum` (alpha ||c||_1). (The dead-latent alpha at the largest ratio is where a too-large
dictionary is still dense: on the selector study's development worlds its MMCS was 0.3-0.47
below the grid's best.) The dead-latent alpha is used only when no ratio has a ridge.

With `dead_consistent` (off by default; experiments/selector_study.py scores it as
`combined_dead_free`) the alpha must also agree with the dead-latent evidence at the chosen ratio
(penalty architectures: relu_l1, jumprelu): when some cell at that ratio has no dead latents and
the ridge's cell has some, alpha moves to the dead-free cell nearest to the ridge's alpha in log
alpha (`_consistent_with_dead`). That helps where the penalty killed latents (a world with many
active features and no correlation: the ridge peaked at alpha 1, a cell with 2 dead latents,
while alpha 0.3 had none and the higher MMCS), and hurts where the chosen dictionary is larger
than the data's features: on the report's world (docs/toy-small) the dead-free cells at the
dead-latent ratio 2 are the dense ones (alpha <= 0.1, MMCS 0.93) while the ridge's alpha 0.56
(22 dead latents of 256) reaches the grid's best, 0.9989. MMCS with larger dictionaries cannot pick the size on
its own: a too-small dictionary learns the most frequent features, which every larger one also
has, so it scores as high as the right size. When no cell is free of dead latents, the ratio
is the one most methods name. The methods that agree and disagree are listed.

Fixed-L0 architectures (TopK, BatchTopK: k sets the sparsity) take the ratio from the live
latents instead (`by_live_latents`): the smallest dictionary with at least as many latents as the
largest one keeps alive (fires on the evaluation samples). No latent of theirs dies of a penalty,
so the largest dictionary's live latents count the directions the data supports; the dead-latent
method, read at a window of a few steps, found rarely firing features' latents dead in every
cell but the smallest (on 36 held-out TopK worlds its ratio gave a median regret of 0.21,
against 0.008 from the live latents; experiments/REPORT.md). k is then
the MMCS-with-larger ridge's at that ratio, carried unchanged to the largest one.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def _pick(method: str, i: int | None, j: int | None, l1_axis, ratio_axis, why: str) -> dict:
    if i is None or j is None:
        return {"method": method, "ratio": None, "l1": None, "why": why}
    return {"method": method, "ratio": float(ratio_axis[j]), "l1": float(l1_axis[i]), "why": why}


def by_dead_latents(dead_AxR: np.ndarray, l1_axis, ratio_axis) -> dict:
    """Largest ratio with a dead-free cell, then the largest dead-free alpha at that ratio."""
    ok = np.nan_to_num(dead_AxR, nan=np.inf) <= 0
    cols = [j for j in range(ok.shape[1]) if ok[:, j].any()]
    if not cols:
        return _pick("dead_latents", None, None, l1_axis, ratio_axis, "every cell has dead latents")
    j = max(cols)
    i = int(np.max(np.nonzero(ok[:, j])[0]))
    return _pick("dead_latents", i, j, l1_axis, ratio_axis,
                 "largest dictionary and alpha with no dead latents")


def by_live_latents(alive_AxR: np.ndarray, l1_axis, ratio_axis) -> dict:
    """For a fixed-L0 architecture (TopK, BatchTopK; k fixes the sparsity, so no latent dies of
    the penalty): the smallest dictionary with at least as many latents as the largest one keeps
    alive, ratio_j >= max_i alive_iJ ratio_J (alive: the fraction of latents that fire on the
    evaluation samples; J the largest ratio). A latent of a fixed-L0 SAE that never fires is
    surplus, so the largest dictionary's live latents count the directions the data supports."""
    rows = [j for j in range(alive_AxR.shape[1]) if np.isfinite(alive_AxR[:, j]).any()]
    if len(rows) < 2:
        return _pick("live_latents", None, None, l1_axis, ratio_axis, "needs at least two dictionary sizes")
    J = max(rows)
    need = float(np.nanmax(alive_AxR[:, J])) * ratio_axis[J]
    j = next(jj for jj in rows if ratio_axis[jj] >= need * (1 - 1e-9))
    return {"method": "live_latents", "ratio": float(ratio_axis[j]), "l1": None,
            "why": f"smallest dictionary with at least as many latents as the largest one keeps "
                   f"alive (ratio {need:.3g})"}


def by_ssll(ssll_AxR: np.ndarray, l1_axis, ratio_axis, min_prominence: float = 0.5) -> dict:
    """Smallest ratio whose SSLL-vs-alpha curve peaks strictly inside the alpha range, at least
    `min_prominence` (z units) above the curve's values at both ends."""
    for j in range(ssll_AxR.shape[1]):
        col = ssll_AxR[:, j]
        finite = np.nonzero(np.isfinite(col))[0]
        if len(finite) < 3:
            continue
        i = int(finite[np.argmax(col[finite])])
        if finite[0] < i < finite[-1] and col[i] - max(col[finite[0]], col[finite[-1]]) >= min_prominence:
            return _pick("ssll", i, j, l1_axis, ratio_axis,
                         "smallest dictionary whose SSLL has an interior peak along alpha")
    return _pick("ssll", None, None, l1_axis, ratio_axis, "no SSLL curve has an interior peak")


def by_mmcs_with_larger(larger_AxR: np.ndarray, l1_axis, ratio_axis) -> dict:
    """The cell of highest MMCS with the larger dictionaries at the same alpha."""
    if not np.isfinite(larger_AxR).any():
        return _pick("mmcs_with_larger", None, None, l1_axis, ratio_axis,
                     "needs at least two dictionary sizes")
    i, j = np.unravel_index(np.nanargmax(larger_AxR), larger_AxR.shape)
    return _pick("mmcs_with_larger", int(i), int(j), l1_axis, ratio_axis,
                 "highest MMCS with the larger dictionaries at the same alpha")


def _carried_ridge_alpha(larger_AxR: np.ndarray, j: int, l1_axis, ratio_axis,
                         size_exponent: float) -> tuple[float, str] | None:
    """The ridge's peak alpha at the nearest smaller ratio with a ridge, times (r_j / r')^p,
    snapped to the grid (nearest in log alpha); None when no smaller ratio has a ridge."""
    below = [jj for jj in range(j) if np.isfinite(larger_AxR[:, jj]).any()]
    if not below:
        return None
    jj = max(below)
    alpha = float(l1_axis[int(np.nanargmax(larger_AxR[:, jj]))])
    target = alpha * (ratio_axis[j] / ratio_axis[jj]) ** size_exponent
    axis = np.asarray(l1_axis, np.float64)
    pos = axis > 0
    if target <= 0 or not pos.any():
        return alpha, f"alpha from the MMCS-with-larger ridge at ratio {ratio_axis[jj]:g}"
    i = int(np.flatnonzero(pos)[np.argmin(np.abs(np.log(axis[pos]) - np.log(target)))])
    return float(axis[i]), (f"alpha from the MMCS-with-larger ridge at ratio {ratio_axis[jj]:g}, "
                            f"carried to ratio {ratio_axis[j]:g}")


def _consistent_with_dead(i: int, dead_A: np.ndarray, l1_axis) -> int:
    """Alpha index i moved to the nearest (in log alpha; the smaller on a tie) alpha whose cell has
    no dead latents, when i's cell has some and another cell of this ratio has none."""
    ok = np.nan_to_num(dead_A, nan=np.inf) <= 0
    if ok[i] or not ok.any():
        return i
    logs = np.log(np.maximum(np.asarray(l1_axis, np.float64), 1e-300))
    return int(min(np.flatnonzero(ok), key=lambda a: (abs(logs[a] - logs[i]), logs[a])))


def suggest(dead_AxR: np.ndarray, ssll_AxR: np.ndarray, larger_AxR: np.ndarray,
            l1_axis: Sequence[float], ratio_axis: Sequence[float], size_exponent: float = 1.0,
            alive_AxR: np.ndarray | None = None, dead_consistent: bool = False) -> dict:
    """Each method's (ratio, alpha), a combined suggestion, and where the methods agree.
    size_exponent: p in the carried ridge alpha (1 for the report's L1 convention, 0 for sum).
    alive_AxR (fixed-L0 architectures): the fraction of latents alive per cell; then the ratio is
    `by_live_latents`' instead of the dead-latent method's. dead_consistent: alpha moves off a cell
    with dead latents when its ratio has a dead-free one (`_consistent_with_dead`)."""
    dead = by_dead_latents(dead_AxR, l1_axis, ratio_axis)
    methods = [dead, by_ssll(ssll_AxR, l1_axis, ratio_axis),
               by_mmcs_with_larger(larger_AxR, l1_axis, ratio_axis)]
    sizer = dead  # the method whose ratio is taken when it names one
    if alive_AxR is not None:
        live = by_live_latents(alive_AxR, l1_axis, ratio_axis)
        methods.insert(0, live)
        sizer = live if live["ratio"] is not None else dead
    voting = [m for m in methods if m["ratio"] is not None]
    if not voting:
        return {"methods": methods, "ratio": None, "l1": None, "agree": [],
                "disagree": [m["method"] for m in methods],
                "summary": "no method could make a suggestion on this grid"}
    if sizer["ratio"] is not None:
        ratio = sizer["ratio"]
    else:
        counts = Counter(m["ratio"] for m in voting)
        ratio = max(counts, key=lambda r: (counts[r], r == voting[-1]["ratio"]))
    j = list(ratio_axis).index(ratio)
    ridge = larger_AxR[:, j]
    carried = _carried_ridge_alpha(larger_AxR, j, l1_axis, ratio_axis, size_exponent)
    if np.isfinite(ridge).any():
        l1, how = float(l1_axis[int(np.nanargmax(ridge))]), "alpha from the MMCS-with-larger ridge"
    elif carried is not None:
        l1, how = carried
    else:  # a method that names this ratio and an alpha (live_latents names none), else any
        m = next((m for m in sorted(voting, key=lambda m: m["ratio"] != ratio) if m["l1"] is not None),
                 {"l1": l1_axis[0], "method": "the densest setting"})
        l1, how = m["l1"], "alpha from " + m["method"]
    # penalty architectures only: there dead latents can mean too much penalty
    if dead_consistent and alive_AxR is None and l1 in list(l1_axis):
        i = list(l1_axis).index(l1)
        i_ok = _consistent_with_dead(i, np.asarray(dead_AxR)[:, j], l1_axis)
        if i_ok != i:
            l1, how = float(l1_axis[i_ok]), how + (f", moved to alpha {l1_axis[i_ok]:g}, the nearest "
                                                   f"without dead latents at this ratio")
    agree = [m["method"] for m in voting if m["ratio"] == ratio]
    disagree = [m["method"] for m in methods if m["method"] not in agree]  # elsewhere, or silent
    other = [m["method"] for m in voting if m["ratio"] != ratio]
    silent = [m["method"] for m in methods if m["ratio"] is None]
    summary = (f"ratio {ratio:g} ({', '.join(agree)}), {how}"
               + (f"; {', '.join(other)} suggest other ratios" if other else "")
               + (f"; {', '.join(silent)} name no ratio" if silent else "")
               + ("" if disagree else "; all methods agree"))
    return {"methods": methods, "ratio": float(ratio), "l1": float(l1), "agree": agree,
            "disagree": disagree, "summary": summary}
