"""Shared small fixtures for the core tests: tiny toy worlds and keys (CPU-friendly sizes)."""

import jax
import numpy as np
import pytest

from sae_jax import compile_cache, toy

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


# The suite runs on two pytest-xdist workers, a file per worker at a time (pyproject.toml:
# -n 2 --dist loadfile). The files that take longest (`pytest --durations`, on 2 cores) start
# first, so that the two workers finish together instead of one waiting on a long file at the end.
LONGEST_FIRST = ("test_reproduction.py", "test_sharding.py", "test_distributed.py", "test_run.py",
                 "test_archs.py", "test_cli.py", "test_native.py", "test_fast_recipe.py",
                 "test_decoder_bias.py", "test_native_build.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


# The suite shares JAX's persistent compilation cache with the `sae-jax` processes it starts
# (the CLI's cache, sae_jax.compile_cache): a program compiled once, by either pytest worker or
# by a child process, is loaded from disk by the others. On a fresh machine (CI) the cache
# starts empty and fills as the suite runs.
compile_cache.enable()
