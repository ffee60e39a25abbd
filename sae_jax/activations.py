"""On-disk activation stores and users' activation files: open, validate, stream shuffled batches.

A store is a directory that numpy alone can read:

    manifest.json      {"format": "sae_jax.activations/1", "d": d, "n": n, "dtype": "float16",
                        "shards": [{"file": "shard_00000.npy", "rows": r_0}, ...], "source": {...}}
    shard_00000.npy    (r_0, d) array in `dtype`; np.load(path, mmap_mode="r") opens it lazily
    shard_00001.npy    ...

Rows are written shard by shard and the manifest last, so a store may be larger than RAM and an
interrupted write leaves no manifest. Harvested rows are in corpus order: row w·L + t is
position t of window w (consecutive, non-overlapping windows of L = context_len tokens).

Streaming order. Each shard is cut into blocks of `block_rows = max(1, buffer_rows // 8)`
contiguous rows. Epoch e permutes all blocks with `default_rng([seed, e])` and packs them, in
that order, into groups of at most `buffer_rows` rows. A group is loaded, its rows permuted
with `default_rng([seed, e, g])`, and appended to one endless stream; batch k is rows
[k·B, (k+1)·B) of it. So every epoch yields every row exactly once, memory stays at about one
group, and batch k is a function of (seed, B, buffer_rows, k) alone: `start_batch=k` resumes
by loading only the group that holds row k·B.

Users' own activations open through the same `ActivationStore` (`open_activations`): one `.npy`,
a directory of `.npy` shards (sorted by name), or one tensor of a `.safetensors` file, in
float16, bfloat16 or float32, 2-D (n, d) or 3-D (batch, tokens, d) flattened to (batch·tokens, d).
Each is memory-mapped where it lies on disk and read group by group, never whole. Batches keep
bfloat16 as bfloat16 (the device converts); float16 and float32 arrive as float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

FORMAT = "sae_jax.activations/1"
DTYPES = ("float16", "float32")
SHARD_BYTES = 64 * 2**20
_SHARD_RE = re.compile(r"shard_\d{5}\.npy")
USER_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float32": np.dtype(np.float32)}


def _default_shard_rows(d: int, dtype: str) -> int:
    return max(1, SHARD_BYTES // (d * np.dtype(dtype).itemsize))


@dataclasses.dataclass(frozen=True)
class ActivationStore:
    """An opened store: `d` columns, `n` rows, split over `shard_files` with `shard_rows` rows each."""

    path: Path
    d: int
    n: int
    dtype: str
    shard_files: tuple[str, ...]
    shard_rows: tuple[int, ...]
    source: dict
    shard_offsets: tuple[int, ...] = ()  # byte offset of each shard's C-order data; () = .npy files

    def __len__(self) -> int:
        return self.n

    @property
    def batch_dtype(self) -> np.dtype:
        """The dtype `stream` yields by default: bfloat16 stays bfloat16, the rest become float32."""
        return USER_DTYPES["bfloat16"] if self.dtype == "bfloat16" else np.dtype(np.float32)

    def shard(self, i: int) -> np.ndarray:
        """Shard i as a read-only memory map of shape (shard_rows[i], d)."""
        if self.shard_offsets:
            return np.memmap(self.path / self.shard_files[i], USER_DTYPES[self.dtype], "r",
                             self.shard_offsets[i], (self.shard_rows[i], self.d))
        return np.load(self.path / self.shard_files[i], mmap_mode="r")

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in store order, as float32."""
        stop = self.n if stop is None else min(stop, self.n)
        out, offset = [], 0
        for i, rows in enumerate(self.shard_rows):
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                out.append(np.asarray(self.shard(i)[lo:hi], np.float32))
            offset += rows
        return np.concatenate(out) if out else np.zeros((0, self.d), np.float32)

    def validate_values(self, chunk_rows: int = 65536) -> None:
        """Scan every shard in chunks; raise ValueError at the first NaN or Inf."""
        for i in range(len(self.shard_files)):
            shard = self.shard(i)
            for lo in range(0, len(shard), chunk_rows):
                _check_finite(shard[lo : lo + chunk_rows], f"{self.shard_files[i]} rows {lo}..")

    def _epoch_groups(self, seed: int, epoch: int, buffer_rows: int) -> list[list[tuple[int, int, int]]]:
        """Blocks (shard, lo, hi) of one epoch, permuted and packed into groups of ≤ buffer_rows rows."""
        block_rows = max(1, buffer_rows // 8)
        blocks = [
            (i, lo, min(lo + block_rows, r))
            for i, r in enumerate(self.shard_rows)
            for lo in range(0, r, block_rows)
        ]
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        groups: list[list[tuple[int, int, int]]] = [[]]
        size = 0
        for j in order:
            i, lo, hi = blocks[j]
            if groups[-1] and size + (hi - lo) > buffer_rows:
                groups.append([])
                size = 0
            groups[-1].append((i, lo, hi))
            size += hi - lo
        return groups

    def stream(
        self, batch_size: int, seed: int, buffer_rows: int = 131072, start_batch: int = 0,
        dtype: Any = None,
    ) -> Iterator[np.ndarray]:
        """Endless iterator of shuffled (batch_size, d) batches in `dtype` (default `batch_dtype`),
        starting at batch `start_batch`.

        Peak memory is about two copies of one group, 2·buffer_rows·d·itemsize bytes. Batch k
        depends only on (seed, batch_size, buffer_rows, k); the module docstring gives the order.
        """
        if batch_size <= 0 or buffer_rows <= 0 or start_batch < 0:
            raise ValueError(
                f"need batch_size > 0, buffer_rows > 0, start_batch >= 0; "
                f"got {batch_size}, {buffer_rows}, {start_batch}"
            )
        shards = [self.shard(i) for i in range(len(self.shard_files))]
        dtype = self.batch_dtype if dtype is None else np.dtype(dtype)
        epoch, skip = divmod(start_batch * batch_size, self.n)
        carry = np.zeros((0, self.d), USER_DTYPES[self.dtype])
        while True:
            group_end = 0
            for g, blocks in enumerate(self._epoch_groups(seed, epoch, buffer_rows)):
                size = sum(hi - lo for _, lo, hi in blocks)
                group_end += size
                if skip >= group_end:  # resuming: this group lies wholly before batch start_batch
                    continue
                rows = np.concatenate([shards[i][lo:hi] for i, lo, hi in blocks])
                _check_finite(rows, f"{self.path.name} epoch {epoch} group {g}")
                rows = rows[np.random.default_rng([seed, epoch, g]).permutation(size)]
                rows = rows[max(0, skip - (group_end - size)) :]
                skip = 0
                buf = np.concatenate([carry, rows]) if len(carry) else rows
                n_full = len(buf) // batch_size
                for b in range(n_full):
                    yield buf[b * batch_size : (b + 1) * batch_size].astype(dtype)
                carry = buf[n_full * batch_size :]
            epoch += 1


def _check_finite(rows: np.ndarray, where: str) -> None:
    if not np.isfinite(rows).all():
        bad = int(np.argwhere(~np.isfinite(rows))[0][0])
        raise ValueError(f"activation store has NaN/Inf values ({where}, row offset {bad})")


def open_store(path: str | os.PathLike, check_values: bool = True) -> ActivationStore:
    """Open and validate a store: manifest, each shard's shape and dtype, and (by default) finiteness."""
    p = Path(path).expanduser().absolute()
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"not an activation store (no manifest.json): {p}")
    try:
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"format {m.get('format')!r} is not {FORMAT!r}")
        d, n, dtype = int(m["d"]), int(m["n"]), str(m["dtype"])
        files = tuple(str(s["file"]) for s in m["shards"])
        rows = tuple(int(s["rows"]) for s in m["shards"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid manifest {mpath}: {e}") from None
    if dtype not in DTYPES or d <= 0 or n <= 0 or sum(rows) != n:
        raise ValueError(
            f"invalid manifest {mpath}: dtype={dtype}, d={d}, n={n}, shard rows sum to {sum(rows)}"
        )
    for f, r in zip(files, rows):
        if not (p / f).is_file():
            raise ValueError(f"activation store shard missing: {p / f}")
        arr = np.load(p / f, mmap_mode="r")
        if arr.shape != (r, d) or arr.dtype != np.dtype(dtype):
            raise ValueError(
                f"activation store shard {f} has shape {arr.shape} {arr.dtype}, "
                f"manifest says ({r}, {d}) {dtype}"
            )
    store = ActivationStore(p, d, n, dtype, files, rows, dict(m.get("source") or {}))
    if check_values:
        store.validate_values()
    return store


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_FLOAT_NAMES = "float16, bfloat16 or float32"


def _matrix(name: str, shape: tuple[int, ...], dtype: str, nbytes: int) -> tuple[int, int]:
    """(n, d) of a 2-D array or a 3-D one flattened over its leading axes; ValueError otherwise."""
    if dtype not in USER_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} is not {_FLOAT_NAMES}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D (n, d) or 3-D (batch, tokens, d) array, got shape {shape}")
    n, d = int(np.prod(shape[:-1])), int(shape[-1])
    if n == 0 or d == 0:
        raise ValueError(f"{name}: the array is empty (shape {shape})")
    if nbytes < n * d * USER_DTYPES[dtype].itemsize:
        raise ValueError(f"{name}: the file is truncated (shape {shape} needs more bytes than it holds)")
    return n, d


def _npy_layout(path: Path) -> tuple[int, int, str, int]:
    """(n, d, dtype, data offset) of a C-order .npy file, from its header alone.
    A 2-byte void dtype is bfloat16 (how numpy saves ml_dtypes.bfloat16 arrays)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path.name}: the file is empty")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise ValueError(f"{path.name}: not a .npy file ({str(e).splitlines()[0]})") from None
        offset = f.tell()
    name = "bfloat16" if dtype == np.dtype("V2") else dtype.name
    if fortran and len(shape) > 1:
        raise ValueError(f"{path.name}: Fortran-order arrays are not supported (save np.ascontiguousarray(x))")
    n, d = _matrix(path.name, shape, name, size - offset)
    return n, d, name, offset


def _safetensors_layout(path: Path, tensor: str | None) -> tuple[int, int, str, int]:
    """(n, d, dtype, data offset) of one tensor of a .safetensors file (the only one when `tensor` is None)."""
    from sae_jax import st

    head, start = st.header(path)
    names = sorted(head)
    if tensor is None:
        if len(names) != 1:
            raise ValueError(f"{path.name} holds {len(names)} tensors; name one with --tensor ({', '.join(names)})")
        tensor = names[0]
    if tensor not in head:
        raise ValueError(f"{path.name} has no tensor {tensor!r} (it has: {', '.join(names) or 'none'})")
    entry = head[tensor]
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
    begin, end = entry["data_offsets"]
    size = path.stat().st_size - start
    n, d = _matrix(f"{path.name}[{tensor}]", tuple(entry["shape"]), dtype, min(end, size) - begin)
    return n, d, dtype, start + begin


def open_activations(path: str | os.PathLike, tensor: str | None = None, check_values: bool = True) -> ActivationStore:
    """Open any supported activations as a store: a store directory, one .npy, a directory of .npy
    shards (sorted by name, same d and dtype), or a .safetensors tensor (`tensor`, needed when the
    file holds several). Only headers are read here; with `check_values` every row is scanned for
    NaN/Inf in memory-mapped chunks. Bad input raises ValueError with a one-line message."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    is_st = p.suffix == ".safetensors"
    if tensor is not None and not is_st:
        raise ValueError(f"a tensor name applies only to a .safetensors file, not {p.name}")
    if p.is_dir() and (p / "manifest.json").exists():
        return open_store(p, check_values)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.npy") if f.is_file())
        if not files:
            raise ValueError(f"{p.name} is neither an activation store (manifest.json) nor a directory of .npy files")
        layouts = [_npy_layout(f) for f in files]
        kinds = {(d, dt) for _, d, dt, _ in layouts}
        if len(kinds) != 1:
            raise ValueError(f"the .npy shards differ in width or dtype: {sorted(kinds)}")
    elif p.suffix == ".npy":
        files, layouts = [p], [_npy_layout(p)]
    elif is_st:
        files, layouts = [p], [_safetensors_layout(p, tensor)]
    else:
        raise ValueError(f"{p.name}: expected a store directory, a .npy file, a directory of .npy files "
                         "or a .safetensors file")
    n_rows = tuple(n for n, _, _, _ in layouts)
    _, d, dtype, _ = layouts[0]
    source = {"kind": "user", "path": str(p), **({"tensor": tensor} if tensor else {})}
    store = ActivationStore(files[0].parent, d, sum(n_rows), dtype, tuple(f.name for f in files), n_rows,
                            source, tuple(off for _, _, _, off in layouts))
    if check_values:
        store.validate_values()
    return store


class StoreWriter:
    """Append rows to a new store shard by shard; `close()` writes the manifest and returns the store."""

    def __init__(
        self,
        path: str | os.PathLike,
        d: int,
        shard_rows: int | None = None,
        dtype: str = "float16",
        source: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = Path(path).expanduser().absolute()
        if (self.path / "manifest.json").exists() and not overwrite:
            raise FileExistsError(f"activation store already exists: {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        for f in self.path.iterdir():
            if f.name == "manifest.json" or _SHARD_RE.fullmatch(f.name):
                f.unlink()
        self.d, self.dtype, self.source = d, dtype, dict(source or {})
        self.shard_rows = shard_rows or _default_shard_rows(d, dtype)
        self._buf = np.empty((self.shard_rows, d), dtype)
        self._fill = 0
        self._shards: list[dict[str, Any]] = []
        self.n = 0

    def append(self, rows_NxD: np.ndarray) -> None:
        """Cast rows to the store dtype and buffer them; full shards go to disk."""
        rows_NxD = np.asarray(rows_NxD)
        if rows_NxD.ndim != 2 or rows_NxD.shape[1] != self.d:
            raise ValueError(f"expected activations of shape (n, {self.d}), got {rows_NxD.shape}")
        with np.errstate(over="ignore"):
            cast = rows_NxD.astype(self.dtype)
        where = f"writing rows {self.n}..{self.n + len(cast)}, NaN/Inf or beyond {self.dtype} range"
        _check_finite(cast, where)
        while len(cast):
            k = min(len(cast), self.shard_rows - self._fill)
            self._buf[self._fill : self._fill + k] = cast[:k]
            self._fill += k
            self.n += k
            cast = cast[k:]
            if self._fill == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if self._fill:
            name = f"shard_{len(self._shards):05d}.npy"
            np.save(self.path / name, self._buf[: self._fill])
            self._shards.append({"file": name, "rows": self._fill})
            self._fill = 0

    def close(self) -> ActivationStore:
        self._flush()
        if self.n == 0:
            raise ValueError(f"no rows were written to {self.path}")
        manifest = {
            "format": FORMAT, "d": self.d, "n": self.n, "dtype": self.dtype,
            "shards": self._shards, "source": self.source,
        }
        (self.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return open_store(self.path, check_values=False)


def write_store(
    path: str | os.PathLike,
    array_NxD: np.ndarray,
    shard_rows: int | None = None,
    dtype: str = "float16",
    source: dict | None = None,
    overwrite: bool = False,
) -> ActivationStore:
    """Write a user's (n, d) array (in memory or a memmap) as a store; NaN/Inf raise ValueError."""
    array_NxD = np.asarray(array_NxD)  # a memmap stays on disk: only shard-sized slices are read
    if array_NxD.ndim != 2 or array_NxD.shape[0] == 0 or array_NxD.shape[1] == 0:
        raise ValueError(f"activations must be a non-empty 2-D (n, d) array, got shape {array_NxD.shape}")
    source = {"kind": "user", **(source or {})}
    writer = StoreWriter(path, array_NxD.shape[1], shard_rows, dtype, source, overwrite)
    step = writer.shard_rows
    for lo in range(0, len(array_NxD), step):
        writer.append(array_NxD[lo : lo + step])
    return writer.close()
