"""The grid's specification: which cells it has (architecture, sparsity setting, dictionary size,
input-noise std, seed) and how they group. Pure data; `sae_jax.grid` trains it."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from sae_jax import archs, toy
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
    slot: int  # position inside its group
    noise: float = 0.0  # input-noise std (denoising grids)
    arch: str = "relu_l1"
    k: int = 0  # topk / batchtopk: active latents per sample
    l0_coeff: float = 0.0  # jumprelu: lambda
    world_value: float | None = None  # the world knob's value (grids with a world axis)

    @property
    def arch_spec(self) -> archs.Arch:
        return archs.Arch(self.arch, self.k)

    @property
    def coeff(self) -> float:
        """The traced sparsity coefficient: alpha (relu_l1), lambda (jumprelu), else 0."""
        return self.l0_coeff if self.arch == "jumprelu" else self.l1_coeff

    @property
    def sparsity(self) -> float:
        """The architecture's sparsity setting: alpha, k or lambda."""
        return {"relu_l1": self.l1_coeff, "jumprelu": self.l0_coeff}.get(self.arch, self.k)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The grid: every (architecture, sparsity, dict_size, noise, seed). Cells are ordered by
    architecture, then size, then sparsity (alpha for relu_l1, k for topk/batchtopk, lambda for
    jumprelu), then input-noise std (denoising; (0,) for plain autoencoders), then the world
    axis's value (`world_values`, when a toy-world knob is swept), then seed. A group
    holds the cells of one (architecture, size), and of one k for topk/batchtopk."""

    l1_coeff: tuple[float, ...]  # alpha (relu_l1 cells)
    dict_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    features: int | None = None  # h, when sizes came from ratios (for reporting only)
    noise: tuple[float, ...] = (0.0,)
    archs: tuple[str, ...] = ("relu_l1",)
    k: tuple[int, ...] = ()  # topk / batchtopk cells
    l0_coeff: tuple[float, ...] = ()  # lambda (jumprelu cells)
    world_axis: str = ""  # a toy-world knob swept in the same step (`toy.axis_worlds`); "": none
    world_values: tuple[float, ...] = ()

    @classmethod
    def from_ratios(cls, l1_coeff: Sequence[float], ratios: Sequence[float], features: int,
                    seeds: int | Sequence[int] = 1, noise: Sequence[float] = (0.0,),
                    archs: Sequence[str] = ("relu_l1",), k: Sequence[int] = (),
                    l0_coeff: Sequence[float] = (), world_axis: str = "",
                    world_values: Sequence[float] = ()) -> "GridSpec":
        """Dictionary sizes m = round(ratio * features)."""
        _check_positive("ratios", ratios)
        sizes = tuple(max(1, int(round(r * features))) for r in ratios)
        if isinstance(seeds, int):
            if seeds < 1:
                raise UsageError(f"`seeds` must be >= 1, got {seeds}", field="seeds")
            seeds = tuple(range(seeds))
        return cls(tuple(float(a) for a in l1_coeff), sizes, tuple(seeds), features,
                   tuple(float(n) for n in noise), tuple(archs),
                   tuple(int(v) if v == int(v) else v for v in k),
                   tuple(float(v) for v in l0_coeff), world_axis,
                   tuple(float(v) for v in world_values)).validate()

    def validate(self) -> "GridSpec":
        if not self.archs or len(set(self.archs)) != len(self.archs) or any(a not in archs.ARCHS for a in self.archs):
            raise UsageError(f"`arch` must be distinct values of {', '.join(archs.ARCHS)}, got "
                             f"{list(self.archs)}", field="arch")
        if "relu_l1" in self.archs and not self.l1_coeff:
            raise UsageError("`l1_coeff` needs at least one value", field="l1_coeff")
        if "jumprelu" in self.archs and not self.l0_coeff:
            raise UsageError("`l0_coeff` needs at least one value for jumprelu", field="l0_coeff")
        for v in self.l0_coeff:
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"`l0_coeff` values must be finite and >= 0, got {v}", field="l0_coeff")
        if self.k and not any(a in archs.TOPK_ARCHS for a in self.archs):
            raise UsageError("`k` is for topk and batchtopk, which `arch` does not include", field="k")
        if self.l0_coeff and "jumprelu" not in self.archs:
            raise UsageError("`l0_coeff` is for jumprelu, which `arch` does not include", field="l0_coeff")
        if any(a in archs.TOPK_ARCHS for a in self.archs):
            if not self.k:
                raise UsageError("topk and batchtopk need `k` (at least one value)", field="k")
            if len(set(self.k)) != len(self.k) or any(k != int(k) or k < 1 for k in self.k):
                raise UsageError(f"`k` must be distinct integers >= 1, got {list(self.k)}", field="k")
            if self.dict_sizes and max(self.k) > min(self.dict_sizes):
                raise UsageError(f"`k` {max(self.k)} exceeds the smallest dictionary size "
                                 f"{min(self.dict_sizes)}", field="k")
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
        toy.check_world_axis(self.world_axis, self.world_values, self.denoising)
        return self

    @property
    def denoising(self) -> bool:
        return any(n > 0 for n in self.noise)

    def ratio(self, m: int) -> float:
        return m / self.features if self.features else float(m)

    def groups(self) -> list[tuple[archs.Arch, int]]:
        """(architecture, dictionary size) of each group, in state order."""
        return [(archs.Arch(a, k), m) for a in self.archs for m in self.dict_sizes
                for k in (self.k if a in archs.TOPK_ARCHS else (0,))]

    def cells(self) -> list[CellSpec]:
        out = []
        for g, (arch, m) in enumerate(self.groups()):
            slot = 0
            coeffs = {"relu_l1": [(a, 0.0) for a in self.l1_coeff],
                      "jumprelu": [(0.0, v) for v in self.l0_coeff]}.get(arch.name, [(0.0, 0.0)])
            for a, lam in coeffs:
                for n in self.noise:
                    for w in (self.world_values or (None,)):
                        for s in self.seeds:
                            out.append(CellSpec(len(out), a, m, self.ratio(m), s, g, slot, n, arch.name,
                                                arch.k, lam, w))
                            slot += 1
        return out

    def to_dict(self) -> dict:
        """As results.json and checkpoints record it (alpha under `l1`; lists). The architecture
        fields appear only when the grid has more than the report's relu_l1."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.archs == ("relu_l1",):
            for k in ("archs", "k", "l0_coeff"):
                del d[k]
        if not self.world_axis:  # (as before world axes)
            for k in ("world_axis", "world_values"):
                del d[k]
        return {("l1" if k == "l1_coeff" else k): v for k, v in d.items()}


def _check_positive(name: str, values: Iterable[float]) -> None:
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"`{name}` must be > 0, got {v}", field=name)
