"""The registry of architectures: one record per architecture (`base.Architecture`), each in
its own module, listed here in the order grids, reports and `--arch` show them.

Adding an architecture: its module in this package (a record: a subclass of
`base.Architecture` and one instance of it), one entry in `REGISTRY`, and tests
(docs/architectures.md, "Adding an architecture"). Every other module asks the record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sae_jax.architectures.base import Architecture, Options
from sae_jax.architectures.batchtopk import BATCHTOPK
from sae_jax.architectures.jumprelu import JUMPRELU
from sae_jax.architectures.matryoshka import MATRYOSHKA
from sae_jax.architectures.relu_l1 import RELU_L1
from sae_jax.architectures.topk import TOPK
from sae_jax.errors import UsageError

REGISTRY: tuple[Architecture, ...] = (RELU_L1, TOPK, BATCHTOPK, JUMPRELU, MATRYOSHKA)
DEFAULT = RELU_L1.name  # the report's; cells and files that name no architecture are its


def names() -> tuple[str, ...]:
    """Every registered architecture's name, in registry order."""
    return tuple(r.name for r in REGISTRY)


def get(name: str) -> Architecture:
    """The record named `name`; UsageError (field `arch`) naming the known ones otherwise."""
    for r in REGISTRY:
        if r.name == name:
            return r
    raise UsageError(f"unknown architecture {name!r}; `arch` must be one of {', '.join(names())}",
                     field="arch")


@dataclasses.dataclass(frozen=True)
class Arch:
    """The static part of a group's architecture: the record's name, k (for records that take
    it, else 0) and overrides of the record's declared options ((key, value) pairs, sorted;
    empty where the defaults hold). Hashable: it sits in jit's static arguments."""

    name: str = DEFAULT
    k: int = 0
    options: Options = ()

    @property
    def record(self) -> Architecture:
        return get(self.name)

    @property
    def uses_k(self) -> bool:
        return self.record.uses_k

    @property
    def has_threshold(self) -> bool:
        return self.record.has_threshold

    def option(self, key: str) -> Any:
        """The value of the record's option `key` for this group."""
        return self.record.option(self, key)
