"""The grid's specification: which cells it has (architecture, sparsity setting, dictionary size,
input-noise std, seed) and how they group. Pure data; `sae_jax.grid` trains it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

from sae_jax import architectures, toy
from sae_jax.architectures import Arch
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
    arch: str = architectures.DEFAULT
    k: int = 0  # topk / batchtopk: active latents per sample
    l0_coeff: float = 0.0  # jumprelu: lambda
    world_value: float | None = None  # the world knob's value (grids with a world axis)
    arch_options: tuple[tuple[str, Any], ...] = ()  # the record's options set by the grid

    @property
    def arch_spec(self) -> Arch:
        return Arch(self.arch, self.k, self.arch_options)

    @property
    def coeff(self) -> float:
        """The traced sparsity coefficient its record reads: alpha ("l1"), lambda ("l0"), else 0."""
        return self.l0_coeff if architectures.get(self.arch).coeff == "l0" else self.l1_coeff

    @property
    def sparsity(self) -> float:
        """The architecture's sparsity setting: alpha, k or lambda."""
        coeff = architectures.get(self.arch).coeff
        return {"l1": self.l1_coeff, "l0": self.l0_coeff}.get(coeff, self.k)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The grid: every (architecture, sparsity, dict_size, noise, seed). Cells are ordered by
    architecture, then size, then sparsity (each record's: alpha for relu_l1, k for
    topk/batchtopk, lambda for jumprelu), then input-noise std (denoising; (0,) for plain
    autoencoders), then the world axis's value (`world_values`, when a toy-world knob is swept),
    then seed. A group holds the cells of one (architecture, size), and of one k for the records
    that take k. `arch_options` sets declared static options of the records
    (`Architecture.options`): (architecture, option, value) triples."""

    l1_coeff: tuple[float, ...]  # alpha (relu_l1 cells)
    dict_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    features: int | None = None  # h, when sizes came from ratios (for reporting only)
    noise: tuple[float, ...] = (0.0,)
    archs: tuple[str, ...] = (architectures.DEFAULT,)
    k: tuple[int, ...] = ()  # topk / batchtopk cells
    l0_coeff: tuple[float, ...] = ()  # lambda (jumprelu cells)
    world_axis: str = ""  # a toy-world knob swept in the same step (`toy.axis_worlds`); "": none
    world_values: tuple[float, ...] = ()
    arch_options: tuple[tuple[str, str, Any], ...] = ()

    @classmethod
    def from_ratios(cls, l1_coeff: Sequence[float], ratios: Sequence[float], features: int,
                    seeds: int | Sequence[int] = 1, noise: Sequence[float] = (0.0,),
                    archs: Sequence[str] = (architectures.DEFAULT,), k: Sequence[int] = (),
                    l0_coeff: Sequence[float] = (), world_axis: str = "",
                    world_values: Sequence[float] = (),
                    arch_options: Iterable[tuple[str, str, Any]] = ()) -> "GridSpec":
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
                   tuple(float(v) for v in world_values), tuple(sorted(arch_options, key=lambda t: t[:2]))).validate()

    def validate(self) -> "GridSpec":
        known = architectures.names()
        if not self.archs or len(set(self.archs)) != len(self.archs) or any(a not in known for a in self.archs):
            raise UsageError(f"`arch` must be distinct values of {', '.join(known)}, got "
                             f"{list(self.archs)}", field="arch")
        records = [architectures.get(a) for a in self.archs]
        reads = lambda coeff: [r.name for r in records if r.coeff == coeff]
        with_k = [r.name for r in records if r.uses_k]
        if reads("l1") and not self.l1_coeff:
            raise UsageError("`l1_coeff` needs at least one value", field="l1_coeff")
        if reads("l0") and not self.l0_coeff:
            raise UsageError(f"`l0_coeff` needs at least one value for {', '.join(reads('l0'))}", field="l0_coeff")
        for v in self.l0_coeff:
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"`l0_coeff` values must be finite and >= 0, got {v}", field="l0_coeff")
        if self.k and not with_k:
            raise UsageError(f"`k` is for {_which(lambda r: r.uses_k)}, which `arch` does not include", field="k")
        if self.l0_coeff and not reads("l0"):
            raise UsageError(f"`l0_coeff` is for {_which(lambda r: r.coeff == 'l0')}, which `arch` does not "
                             "include", field="l0_coeff")
        if with_k:
            if not self.k:
                raise UsageError(f"{_which(lambda r: r.uses_k)} need `k` (at least one value)", field="k")
            if len(set(self.k)) != len(self.k) or any(k != int(k) or k < 1 for k in self.k):
                raise UsageError(f"`k` must be distinct integers >= 1, got {list(self.k)}", field="k")
            if self.dict_sizes and max(self.k) > min(self.dict_sizes):
                raise UsageError(f"`k` {max(self.k)} exceeds the smallest dictionary size "
                                 f"{min(self.dict_sizes)}", field="k")
        self._validate_arch_options()
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
        for arch, m in self.groups():
            arch.record.check(arch, m)
        return self

    def _validate_arch_options(self) -> None:
        for name, key, _ in self.arch_options:
            if name not in self.archs:
                raise UsageError(f"`arch_options` sets {name}.{key}, but `arch` does not include {name}",
                                 field="arch_options")
            declared = dict(architectures.get(name).options)
            if key not in declared:
                raise UsageError(f"`arch_options`: {name} has no option {key!r} (it has "
                                 f"{', '.join(declared) or 'none'})", field="arch_options")
        if len({(n, k) for n, k, _ in self.arch_options}) != len(self.arch_options):
            raise UsageError("`arch_options` sets an option twice", field="arch_options")

    def options_of(self, name: str) -> tuple[tuple[str, Any], ...]:
        """The options `arch_options` sets for architecture `name`, as `Arch.options`."""
        return tuple(sorted((k, v) for n, k, v in self.arch_options if n == name))

    @property
    def denoising(self) -> bool:
        return any(n > 0 for n in self.noise)

    def ratio(self, m: int) -> float:
        return m / self.features if self.features else float(m)

    def groups(self) -> list[tuple[Arch, int]]:
        """(architecture, dictionary size) of each group, in state order."""
        return [(Arch(a, k, self.options_of(a)), m) for a in self.archs for m in self.dict_sizes
                for k in (self.k if architectures.get(a).uses_k else (0,))]

    def cells(self) -> list[CellSpec]:
        out = []
        for g, (arch, m) in enumerate(self.groups()):
            slot = 0
            coeffs = {"l1": [(a, 0.0) for a in self.l1_coeff],
                      "l0": [(0.0, v) for v in self.l0_coeff]}.get(arch.record.coeff, [(0.0, 0.0)])
            for a, lam in coeffs:
                for n in self.noise:
                    for w in (self.world_values or (None,)):
                        for s in self.seeds:
                            out.append(CellSpec(len(out), a, m, self.ratio(m), s, g, slot, n, arch.name,
                                                arch.k, lam, w, arch.options))
                            slot += 1
        return out

    def to_dict(self) -> dict:
        """As results.json and checkpoints record it (alpha under `l1`; lists). The architecture
        fields appear only when the grid has more than the report's relu_l1, `arch_options`
        only where it sets any."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.archs == (architectures.DEFAULT,):
            for k in ("archs", "k", "l0_coeff"):
                del d[k]
        if not self.arch_options:
            del d["arch_options"]
        if not self.world_axis:  # (as before world axes)
            for k in ("world_axis", "world_values"):
                del d[k]
        return {("l1" if k == "l1_coeff" else k): v for k, v in d.items()}


def _which(has: Callable[[architectures.Architecture], bool]) -> str:
    """The registered architectures with a property, for messages ("topk and batchtopk")."""
    return " and ".join(r.name for r in architectures.REGISTRY if has(r))


def _check_positive(name: str, values: Iterable[float]) -> None:
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"`{name}` must be > 0, got {v}", field=name)
