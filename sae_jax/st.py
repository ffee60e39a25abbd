"""safetensors files with numpy alone (no `safetensors` package needed to read or write them).

Layout: an unsigned 64-bit little-endian header length N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the tensors' raw little-endian C-order bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
          "F64": np.dtype("<f8"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "U8": np.dtype("u1"),
          "BOOL": np.dtype(bool)}
_CODES = {v: k for k, v in DTYPES.items()}


def header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header without "__metadata__", byte offset of the data); ValueError for anything malformed."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{p.name}: the file is empty")
    with open(p, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            head = json.loads(f.read(n))
            if not isinstance(head, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{p.name}: not a safetensors file ({e})") from None
    head.pop("__metadata__", None)
    return head, 8 + n


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's "__metadata__" (string to string)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return dict(json.loads(f.read(n)).get("__metadata__") or {})


def load(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The named tensors (default: all) as read-only memory maps."""
    head, start = header(path)
    out = {}
    for name in head if names is None else names:
        if name not in head:
            raise ValueError(f"{Path(path).name} has no tensor {name!r}")
        e = head[name]
        dtype = DTYPES[e["dtype"]]
        shape = tuple(e["shape"])
        if int(np.prod(shape)) == 0:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype, "r", start + e["data_offsets"][0], shape)
    return out


def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    """Write tensors (in the given order) and string metadata; atomic (temporary file, then rename)."""
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}  # 0-d stays 0-d
    head: dict = {"__metadata__": {str(k): str(v) for k, v in (meta or {}).items()}} if meta else {}
    offset = 0
    for name, a in arrays.items():
        if a.dtype.newbyteorder("<") not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        head[name] = {"dtype": _CODES[a.dtype.newbyteorder("<")], "shape": list(a.shape),
                      "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
