"""One-to-one matching of a learned dictionary to a reference (ground truth), in bounded memory.

A matching pairs each reference row g with at most one learned row d, and each d with at most
one g. From it:

- MCC (mean matched cosine) = (1/|G|) sum over matched pairs of cos(d, g); a reference row left
  unmatched (fewer latents than features) counts 0;
- recovered = (1/|G|) #{matched pairs with cos(d, g) > threshold} (0.9 by default);
- redundant = #{unmatched learned d : max over matched learned d' of cos(d, d') > threshold}:
  latents that duplicate one already used for a feature.

The matching maximises sum cos(d, g) with the Hungarian algorithm
(`scipy.optimize.linear_sum_assignment`) while |G| x |D| <= HUNGARIAN_MAX_ENTRIES; beyond that
it is greedy: reference rows in descending order of their best cosine each take their most
similar unused latent, the similarities computed a block of reference rows at a time, so memory
stays O(block x |D|). Cosines are signed, as in MMCS.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from sae_jax import metrics

HUNGARIAN_MAX_ENTRIES = 4096 * 4096


class Matching(NamedTuple):
    reference: np.ndarray  # (P,) reference row indices
    learned: np.ndarray  # (P,) learned row indices, one per reference row above
    cos: np.ndarray  # (P,) cosine of each pair
    method: str  # "hungarian" or "greedy"


def _unit(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)


def hungarian_match(learned_MxD, reference_NxD) -> Matching:
    """The one-to-one matching of maximum total cosine (min(M, N) pairs)."""
    learned, ref = _unit(learned_MxD), _unit(reference_NxD)
    sim_NxM = ref @ learned.T
    rows, cols = linear_sum_assignment(sim_NxM, maximize=True)
    return Matching(rows, cols, sim_NxM[rows, cols], "hungarian")


def greedy_match(learned_MxD, reference_NxD, block: int = 1024) -> Matching:
    """Reference rows in descending order of their best cosine each take their most similar
    still-unused learned row (min(M, N) pairs); memory O(block x M)."""
    learned, ref = _unit(learned_MxD), _unit(reference_NxD)
    best = np.asarray(metrics.max_cosine(learned, ref, block=block))
    order = np.argsort(-best, kind="stable")
    used = np.zeros(len(learned), bool)
    pairs_r, pairs_l, pairs_c = [], [], []
    for start in range(0, len(order), block):
        if used.all():
            break
        rows = order[start:start + block]
        sim = ref[rows] @ learned.T
        sim[:, used] = -np.inf
        for i, r in enumerate(rows):
            j = int(np.argmax(sim[i]))
            if used[j]:  # every learned row is taken
                break
            pairs_r.append(r), pairs_l.append(j), pairs_c.append(sim[i, j])
            used[j] = True
            sim[:, j] = -np.inf
    return Matching(np.asarray(pairs_r, int), np.asarray(pairs_l, int),
                    np.asarray(pairs_c, np.float32), "greedy")


def match(learned_MxD, reference_NxD, block: int = 1024) -> Matching:
    """Hungarian when |G| x |D| <= HUNGARIAN_MAX_ENTRIES, greedy beyond."""
    if np.shape(learned_MxD)[0] * np.shape(reference_NxD)[0] <= HUNGARIAN_MAX_ENTRIES:
        return hungarian_match(learned_MxD, reference_NxD)
    return greedy_match(learned_MxD, reference_NxD, block)


def redundant(learned_MxD, matched_learned: np.ndarray, threshold: float = 0.9,
              block: int = 1024) -> int:
    """Unmatched learned rows within cos > threshold of some matched learned row."""
    learned = _unit(learned_MxD)
    free = np.ones(len(learned), bool)
    free[matched_learned] = False
    if not free.any() or free.all():
        return 0
    near = np.asarray(metrics.max_cosine(learned[~free], learned[free], block=block))
    return int(np.sum(near > threshold))


def matching_metrics(learned_MxD, reference_NxD, threshold: float = 0.9, block: int = 1024) -> dict:
    """{"mcc", "recovered", "redundant", "matching"} of a learned dictionary against a reference."""
    m = match(learned_MxD, reference_NxD, block)
    n = np.shape(reference_NxD)[0]
    return {"mcc": float(np.sum(m.cos) / n), "recovered": float(np.sum(m.cos > threshold) / n),
            "redundant": redundant(learned_MxD, m.learned, threshold, block), "matching": m.method}


def per_cell(dicts: list[np.ndarray], reference_NxD, skip: set[int] = frozenset()) -> list[dict]:
    """matching_metrics (without the method name) for every dictionary; None for skipped cells."""
    out = []
    for i, d in enumerate(dicts):
        if i in skip:
            out.append({"mcc": None, "recovered": None, "redundant": None})
        else:
            mm = matching_metrics(d, reference_NxD)
            mm.pop("matching")
            out.append(mm)
    return out
