"""Shared small fixtures for the core tests: tiny toy worlds and keys (CPU-friendly sizes)."""

import jax
import numpy as np
import pytest

from sae_jax import toy

jax.config.update("jax_enable_x64", False)

TINY = toy.ToyConfig(d=16, features=32, mean_active=3.0)


@pytest.fixture(scope="session")
def tiny_cfg() -> toy.ToyConfig:
    """d = 16, h = 32, k = 3; the report's decay and correlation (fresh z per batch)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_world() -> toy.ToyWorld:
    return toy.make_world(jax.random.PRNGKey(1), TINY)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
