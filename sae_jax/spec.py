"""The grid's specification: which cells (alpha x dictionary size x input-noise std x seed) a
grid holds, and in what order. Plain data; `sae_jax.grid` holds the state and the step."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from sae_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One cell of the grid: its hyperparameters and where its state lives."""

    index: int
    l1_coeff: float  # alpha
    dict_size: int
    ratio: float
    seed: int
    group: int
    slot: int  # position inside its size group
    noise: float = 0.0  # input-noise std (denoising grids)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The grid: every (alpha, dict_size, noise, seed). Cells are ordered size-major, then alpha,
    then input-noise std (denoising; (0,) for plain autoencoders), then seed."""

    l1_coeff: tuple[float, ...]  # alpha
    dict_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    features: int | None = None  # h, when sizes came from ratios (for reporting only)
    noise: tuple[float, ...] = (0.0,)

    @classmethod
    def from_ratios(cls, l1_coeff: Sequence[float], ratios: Sequence[float], features: int,
                    seeds: int | Sequence[int] = 1, noise: Sequence[float] = (0.0,)) -> "GridSpec":
        """Dictionary sizes m = round(ratio * features)."""
        _check_positive("ratios", ratios)
        sizes = tuple(max(1, int(round(r * features))) for r in ratios)
        if isinstance(seeds, int):
            if seeds < 1:
                raise UsageError(f"`seeds` must be >= 1, got {seeds}", field="seeds")
            seeds = tuple(range(seeds))
        return cls(tuple(float(a) for a in l1_coeff), sizes, tuple(seeds), features,
                   tuple(float(n) for n in noise)).validate()

    def validate(self) -> "GridSpec":
        if not self.l1_coeff:
            raise UsageError("`l1_coeff` needs at least one value", field="l1_coeff")
        for a in self.l1_coeff:
            if not (math.isfinite(a) and a >= 0):
                raise UsageError(f"`l1_coeff` values must be finite and >= 0, got {a}", field="l1_coeff")
        if not self.dict_sizes:
            raise UsageError("`dict_sizes` needs at least one value", field="dict_sizes")
        _check_positive("dict_sizes", self.dict_sizes)
        if any(m != int(m) for m in self.dict_sizes):
            raise UsageError(f"dictionary sizes must be integers, got {list(self.dict_sizes)}", field="dict_sizes")
        if len(set(self.dict_sizes)) != len(self.dict_sizes):
            raise UsageError(f"dictionary sizes must be distinct, got {list(self.dict_sizes)}", field="dict_sizes")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"`seeds` must be >= 1 distinct seeds, got {list(self.seeds)}", field="seeds")
        for n in self.noise:
            if not (math.isfinite(n) and n >= 0):
                raise UsageError(f"noise std values must be finite and >= 0, got {n}", field="noise")
        return self

    @property
    def denoising(self) -> bool:
        return any(n > 0 for n in self.noise)

    def ratio(self, m: int) -> float:
        return m / self.features if self.features else float(m)

    def cells(self) -> list[CellSpec]:
        out = []
        for g, m in enumerate(self.dict_sizes):
            slot = 0
            for a in self.l1_coeff:
                for n in self.noise:
                    for s in self.seeds:
                        out.append(CellSpec(len(out), a, m, self.ratio(m), s, g, slot, n))
                        slot += 1
        return out

    def to_dict(self) -> dict:
        """As results.json and checkpoints record it (alpha under `l1`; lists)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {("l1" if k == "l1_coeff" else k): v for k, v in d.items()}


def _check_positive(name: str, values: Iterable[float]) -> None:
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"`{name}` must be > 0, got {v}", field=name)
