"""Helpers shared by the tests that run `sae-jax` end to end (tests/test_run.py,
tests/test_distributed.py)."""

from __future__ import annotations

import json
import os

import numpy as np

# the environment of a child `sae-jax` process: the parent's, less any JAX_ setting
ENV = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
SMALL = ["toy", "--d", "16", "--features", "32", "--l1", "0.1,0.3,1", "--ratios", "1,2",
         "--no-progress", "--no-figures", "--eval-samples", "512"]


def load(out: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(results.json, dictionaries.npz) of the run in `out`."""
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with np.load(os.path.join(out, "dictionaries.npz")) as z:
        return res, {k: z[k] for k in z.files}
