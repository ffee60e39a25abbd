"""Choosing (dictionary ratio, alpha) from a finished grid without ground truth.

The report's three methods, each read off the (alpha x ratio) plane:

- dead latents: the largest dictionary, then the largest alpha, whose cells have no dead latent;
- loss stickiness: SSLL = z(log recon) + z(log L1) has an interior peak along alpha only where
  the dictionary is large enough; take the smallest ratio with such a peak, at its peak alpha;
- MMCS with larger dictionaries: the ridge, i.e. the cell where a dictionary agrees best with
  the larger dictionaries trained at the same alpha.

The combined suggestion takes the ratio most methods agree on (ties go to the MMCS-with-larger
method), and the geometric mean of those methods' alphas, snapped to the grid.
"""

from __future__ import annotations

import math
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


def by_ssll(ssll_AxR: np.ndarray, l1_axis, ratio_axis) -> dict:
    """Smallest ratio whose SSLL-vs-alpha curve peaks strictly inside the alpha range."""
    for j in range(ssll_AxR.shape[1]):
        col = ssll_AxR[:, j]
        finite = np.nonzero(np.isfinite(col))[0]
        if len(finite) < 3:
            continue
        i = int(finite[np.argmax(col[finite])])
        if finite[0] < i < finite[-1]:
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


def _nearest(values: Sequence[float], target: float) -> float:
    return min(values, key=lambda v: abs(math.log(v) - math.log(target)) if v > 0 else math.inf)


def suggest(dead_AxR: np.ndarray, ssll_AxR: np.ndarray, larger_AxR: np.ndarray,
            l1_axis: Sequence[float], ratio_axis: Sequence[float]) -> dict:
    """Each method's (ratio, alpha), a combined suggestion, and where the methods agree."""
    methods = [by_dead_latents(dead_AxR, l1_axis, ratio_axis),
               by_ssll(ssll_AxR, l1_axis, ratio_axis),
               by_mmcs_with_larger(larger_AxR, l1_axis, ratio_axis)]
    voting = [m for m in methods if m["ratio"] is not None]
    if not voting:
        return {"methods": methods, "ratio": None, "l1": None, "agree": [],
                "disagree": [m["method"] for m in methods],
                "summary": "no method could make a suggestion on this grid"}
    counts = Counter(m["ratio"] for m in voting)
    top = max(counts.values())
    tied = [r for r, c in counts.items() if c == top]
    tie_break = next((m["ratio"] for m in reversed(voting) if m["ratio"] in tied), tied[0])
    ratio = tie_break
    agree = [m["method"] for m in voting if m["ratio"] == ratio]
    alphas = [m["l1"] for m in voting if m["ratio"] == ratio and m["l1"] > 0]
    l1 = _nearest(l1_axis, math.exp(np.mean(np.log(alphas)))) if alphas else \
        next(m["l1"] for m in voting if m["ratio"] == ratio)
    disagree = [m["method"] for m in methods if m["method"] not in agree]
    summary = (f"ratio {ratio:g}, alpha {l1:g}: {', '.join(agree)} agree on the ratio"
               + (f"; {', '.join(disagree)} differ" if disagree else "; all methods agree"))
    return {"methods": methods, "ratio": float(ratio), "l1": float(l1), "agree": agree,
            "disagree": disagree, "summary": summary}
