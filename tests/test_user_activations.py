"""Users' activations: .npy (2-D and 3-D), a directory of .npy shards, .safetensors tensors, in float16,
bfloat16 and float32, memory-mapped; every bad input gives one line and exit status 2."""

import json

import ml_dtypes
import numpy as np
import pytest

from sae_jax import cli
from sae_jax.activations import open_activations

BF16 = ml_dtypes.bfloat16
_ST_NAMES = {np.dtype(np.float16): "F16", np.dtype(BF16): "BF16", np.dtype(np.float32): "F32",
             np.dtype(np.int32): "I32"}


def _write_safetensors(path, tensors: dict) -> None:
    """The safetensors layout written by hand: u64 header length, JSON header, raw C-order data."""
    header, blobs, offset = {"__metadata__": {"by": "test"}}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_every_kind_opens_to_the_same_rows(tmp_path, dtype):
    x_BxTxD = _x((4, 6, 8)).astype(dtype)
    x_NxD = x_BxTxD.reshape(24, 8)
    np.save(tmp_path / "two.npy", x_NxD)
    np.save(tmp_path / "three.npy", x_BxTxD)
    (tmp_path / "shards").mkdir()
    for i, lo in enumerate((0, 5, 17)):  # uneven shards, sorted by name
        np.save(tmp_path / "shards" / f"part_{i:02d}.npy", x_NxD[lo : (5, 17, 24)[i]])
    _write_safetensors(tmp_path / "one.safetensors", {"acts": x_BxTxD})
    _write_safetensors(tmp_path / "many.safetensors", {"resid": _x((3, 5)).astype(dtype), "mlp": x_BxTxD})
    opened = [open_activations(tmp_path / "two.npy"), open_activations(tmp_path / "three.npy"),
              open_activations(tmp_path / "shards"), open_activations(tmp_path / "one.safetensors"),
              open_activations(tmp_path / "many.safetensors", tensor="mlp")]
    for store in opened:
        assert (store.n, store.d, store.dtype) == (24, 8, np.dtype(dtype).name)
        np.testing.assert_array_equal(store.read(), x_NxD.astype(np.float32))
        assert all(isinstance(store.shard(i), np.memmap) for i in range(len(store.shard_files)))
        batch = next(store.stream(6, seed=0, buffer_rows=12))
        assert batch.dtype == (np.dtype(BF16) if dtype is BF16 else np.float32)  # bf16 stays bf16
        assert {tuple(r) for r in batch.astype(np.float32)} <= {tuple(r) for r in x_NxD.astype(np.float32)}
    assert len(opened[2].shard_files) == 3


def test_streaming_a_large_file_reads_only_groups(tmp_path):
    x = _x((20_000, 16))
    np.save(tmp_path / "big.npy", x)
    store = open_activations(tmp_path / "big.npy", check_values=False)
    seen = np.concatenate([b for _, b in zip(range(20_000 // 500), store.stream(500, seed=1, buffer_rows=2_000))])
    np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(x, axis=0))  # one epoch = every row once


def _grid(path, *extra):
    return cli.main(["grid", "--activations", str(path), *extra, "--l1", "0.1", "--ratios", "1",
                     "--steps", "3", "--batch-size", "8", "--out", str(path) + ".run", "--no-progress",
                     "--no-figures", "--checkpoint-every", "0", "--eval-samples", "16"])


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    nan = _x((30, 4))
    nan[7, 2] = np.nan
    inf = _x((30, 4)).astype(BF16)
    inf[29, 0] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "infdir").mkdir()
    np.save(tmp_path / "infdir" / "a.npy", _x((10, 4)).astype(BF16))
    np.save(tmp_path / "infdir" / "b.npy", inf)
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", _x((10, 4)))
    np.save(tmp_path / "mixed" / "b.npy", _x((10, 5)))
    np.save(tmp_path / "rank1.npy", np.ones(12, np.float32))
    np.save(tmp_path / "rank4.npy", np.ones((2, 2, 2, 2), np.float32))
    np.save(tmp_path / "norows.npy", np.ones((0, 4), np.float32))
    np.save(tmp_path / "ints.npy", np.ones((4, 4), np.int32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "nonpy").mkdir()
    _write_safetensors(tmp_path / "two.safetensors", {"a": _x((5, 4)), "b": _x((5, 4))})
    _write_safetensors(tmp_path / "nan.safetensors", {"a": nan.astype(np.float16)})
    cases = [
        (("nan.npy",), "NaN"), (("infdir",), "NaN/Inf"), (("infdir",), "b.npy"), (("rank1.npy",), "got shape (12,)"),
        (("rank4.npy",), "3-D"), (("norows.npy",), "empty"), (("ints.npy",), "dtype int32"),
        (("empty.npy",), "empty"), (("empty.safetensors",), "empty"), (("junk.safetensors",), "not a safetensors"),
        (("nonpy",), "neither"), (("mixed",), "differ in width"), (("missing.npy",), "does not exist"),
        (("two.safetensors",), "name one with --tensor (a, b)"),
        (("two.safetensors", "--tensor", "c"), "has no tensor 'c' (it has: a, b)"),
        (("nan.npy", "--tensor", "a"), "applies only to a .safetensors"),
        (("nan.safetensors", "--tensor", "a"), "NaN"),
    ]
    for (name, *extra), needle in cases:
        assert _grid(tmp_path / name, *extra) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and err[0].startswith("sae-jax: error: --activations"), (name, err)


def test_a_npy_directory_and_a_bf16_safetensors_tensor_each_train_a_grid(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    for i in range(3):
        np.save(tmp_path / "shards" / f"s{i}.npy", _x((2, 20, 6), seed=i))  # (batch, tokens, d) shards
    _write_safetensors(tmp_path / "acts.safetensors", {"x": _x((64, 6)).astype(BF16), "y": _x((2, 2))})
    assert _grid(tmp_path / "shards") == 0, capsys.readouterr().err
    assert _grid(tmp_path / "acts.safetensors", "--tensor", "x") == 0, capsys.readouterr().err
    for run in ("shards.run", "acts.safetensors.run"):
        res = json.loads((tmp_path / run / "results.json").read_text())
        assert res["config"]["d"] == 6 and res["config"]["n_rows"] == (120 if run == "shards.run" else 64)
        assert len(res["cells"]) == 1 and np.isfinite(res["cells"][0]["fvu"])
