"""Activation stores: round trip, streaming coverage and order, resume, validation, harvest."""

import itertools
import json

import jax
import numpy as np
import pytest

from sae_jax import harvest, transformer
from sae_jax.activations import open_store, write_store
from sae_jax.transformer import TransformerConfig


def _id_rows(n, d=4):
    """Row i holds i in column 0 (exact in float16 up to 2048), noise elsewhere."""
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def _take(it, k):
    return list(itertools.islice(it, k))


def test_round_trip_at_float16_precision(tmp_path):
    x = np.random.default_rng(1).normal(scale=3.0, size=(1000, 24)).astype(np.float32)
    store = write_store(tmp_path / "s", x, shard_rows=300)
    assert (store.d, store.n, store.dtype) == (24, 1000, "float16")
    assert store.shard_rows == (300, 300, 300, 100)
    again = open_store(tmp_path / "s")
    np.testing.assert_array_equal(again.read(), x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(again.read(), x, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(again.read(250, 650), again.read()[250:650])
    # numpy alone can open it
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    shard = np.load(tmp_path / "s" / manifest["shards"][1]["file"], mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (300, 24)
    np.testing.assert_array_equal(shard[0], x[300].astype(np.float16))


@pytest.mark.parametrize("batch_size", [50, 64])
def test_stream_covers_each_row_once_per_epoch(tmp_path, batch_size):
    n = 1000
    store = write_store(tmp_path / "s", _id_rows(n), shard_rows=128)
    buffer_rows = 160  # far smaller than the store
    batches = _take(store.stream(batch_size, seed=0, buffer_rows=buffer_rows), -(-3 * n // batch_size))
    assert all(b.shape == (batch_size, 4) and b.dtype == np.float32 for b in batches)
    ids = np.concatenate(batches)[:, 0].astype(int)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(ids[epoch * n : (epoch + 1) * n]), np.arange(n))
    # shuffled across the whole store, not just within one buffer-sized neighbourhood
    first = ids[:batch_size]
    assert not np.array_equal(first, np.sort(first))
    assert first.max() - first.min() > 2 * buffer_rows
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # each epoch has its own order


def test_stream_is_deterministic_and_resumable(tmp_path):
    store = write_store(tmp_path / "s", _id_rows(700), shard_rows=100)
    kw = dict(batch_size=48, seed=3, buffer_rows=120)
    full = _take(store.stream(**kw), 40)  # crosses two epoch boundaries
    again = _take(store.stream(**kw), 40)
    assert all(np.array_equal(a, b) for a, b in zip(full, again))
    other = _take(store.stream(48, seed=4, buffer_rows=120), 40)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other))
    for k in (1, 7, 14, 15, 33):
        resumed = _take(store.stream(**kw, start_batch=k), 40 - k)
        assert all(np.array_equal(a, b) for a, b in zip(full[k:], resumed)), k


def test_stream_with_buffer_larger_than_store_is_a_full_shuffle(tmp_path):
    store = write_store(tmp_path / "s", _id_rows(100), shard_rows=30)
    ids = np.concatenate(_take(store.stream(25, seed=0, buffer_rows=10_000), 4))[:, 0].astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))


def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_nan_inf_and_bad_shapes_are_rejected(tmp_path):
    x = _id_rows(200)
    bad = x.copy()
    bad[57, 2] = np.nan
    _one_line_value_error(lambda: write_store(tmp_path / "a", bad), "NaN/Inf")
    _one_line_value_error(lambda: write_store(tmp_path / "b", x * 1e6), "NaN/Inf")  # beyond float16
    _one_line_value_error(lambda: write_store(tmp_path / "c", x[0]), "2-D")

    write_store(tmp_path / "s", x, shard_rows=64)
    shard = tmp_path / "s" / "shard_00001.npy"
    corrupt = np.load(shard)
    corrupt[3, 1] = np.inf
    np.save(shard, corrupt)
    _one_line_value_error(lambda: open_store(tmp_path / "s"), "NaN/Inf")
    lazy = open_store(tmp_path / "s", check_values=False)
    _one_line_value_error(lambda: _take(lazy.stream(32, seed=0, buffer_rows=1000), 10), "NaN/Inf")

    np.save(shard, np.zeros((64, 5), np.float16))
    _one_line_value_error(lambda: open_store(tmp_path / "s"), "shape")
    _one_line_value_error(lambda: open_store(tmp_path), "no manifest")


def test_existing_store_is_not_overwritten_silently(tmp_path):
    write_store(tmp_path / "s", _id_rows(10))
    with pytest.raises(FileExistsError):
        write_store(tmp_path / "s", _id_rows(20))
    assert write_store(tmp_path / "s", _id_rows(20), shard_rows=5, overwrite=True).n == 20
    assert len(list((tmp_path / "s").glob("shard_*.npy"))) == 4


def test_harvest_stores_the_models_activations(tmp_path):
    cfg = TransformerConfig(n_layers=3, d_model=32, n_heads=2, d_mlp=48, context_len=16)
    params = transformer.init(jax.random.key(0), cfg)
    tokens_N = np.random.default_rng(0).integers(0, 256, size=16 * 20 + 5).astype(np.uint8)
    store, stats = harvest.byte_lm(params, cfg, tokens_N, 1, tmp_path / "s", batch_size=8,
                                       shard_rows=100, progress=False)
    assert (store.n, store.d) == (320, 48) and stats["tokens"] == 320  # the 20 full windows
    assert store.source["layer"] == 1 and store.source["windows"] == 20
    windows_WxL = tokens_N[: 20 * 16].reshape(20, 16)
    apply = jax.jit(transformer.apply, static_argnums=(2, 3))
    _, acts = apply(params, windows_WxL.astype(np.int32), cfg, (1,))
    expected = np.asarray(acts[1]).reshape(-1, 48)
    # equal at store precision (float16 rounding: relative error ≤ 2⁻¹¹)
    np.testing.assert_allclose(open_store(tmp_path / "s").read(), expected, rtol=2**-11, atol=1e-6)

    # max_tokens: exactly that many rows, from windows spread over the corpus
    store, _ = harvest.byte_lm(params, cfg, tokens_N, 0, tmp_path / "t", max_tokens=40, batch_size=8,
                                   progress=False)
    assert store.n == 40 and store.source["windows"] == 3
    _, acts = apply(params, windows_WxL[[0, 6, 13]].astype(np.int32), cfg, (0,))
    np.testing.assert_allclose(store.read(), np.asarray(acts[0]).reshape(-1, 48)[:40], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="out of range"):
        harvest.byte_lm(params, cfg, tokens_N, 3, tmp_path / "u", progress=False)


def test_harvest_forward_skips_the_layers_after_the_captured_one():
    """XLA's FLOP count of the harvest forward for layer 0 of 3 matches one layer, not three."""
    cfg = TransformerConfig(n_layers=3, d_model=32, n_heads=2, d_mlp=128, context_len=16)
    params = transformer.init(jax.random.key(0), cfg)
    tokens_BxL = np.zeros((4, 16), np.int32)
    cost = harvest._jit_layer_acts.lower(params, tokens_BxL, cfg, 0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    one_layer = transformer.forward_flops(cfg, 4, 16, through_layer=0)
    assert one_layer <= cost["flops"] <= 1.3 * one_layer
