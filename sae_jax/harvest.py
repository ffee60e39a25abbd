"""Harvest a model's MLP activations into an activation store (`sae_jax.activations`).

Two models: our byte-level transformer (`byte_lm`) and the pretrained MiniLM (`minilm`). Both
run the jitted forward of batch j+1 while batch j is copied to the host and written, store
float16 rows in corpus order, and return throughput statistics.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import transformer
from sae_jax.activations import ActivationStore, StoreWriter
from sae_jax.transformer import TransformerConfig

# dispatch(j) -> (device rows (R, F), host index of the rows to keep: a slice or a boolean mask)
Dispatch = Callable[[int], tuple[jax.Array, Any]]


def _pipelined(dispatch: Dispatch, n_batches: int, writer: StoreWriter, n_rows: int, desc: str,
               progress: bool) -> tuple[ActivationStore, dict[str, float]]:
    """Write the kept rows of batches 0..n_batches-1, at most n_rows; (store, {tokens, seconds, tokens_per_s})."""
    from tqdm.auto import tqdm

    dispatch(0)[0].block_until_ready()  # compile outside the timing
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_rows, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    with bar:
        pending = dispatch(0)
        for j in range(1, n_batches + 1):
            upcoming = dispatch(j) if j < n_batches else None  # runs while we write `pending`
            rows = np.asarray(pending[0])[pending[1]][: n_rows - written]
            writer.append(rows)
            written += len(rows)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{written / (time.perf_counter() - t0):,.0f}")
            pending = upcoming
            if written >= n_rows:
                break
    seconds = time.perf_counter() - t0
    store = writer.close()
    return store, {"tokens": float(written), "seconds": seconds, "tokens_per_s": written / seconds}


# ----------------------------------------------------------------------------- byte-level LM


def _layer_acts(params: Any, tokens_BxL: jax.Array, cfg: TransformerConfig, layer: int) -> jax.Array:
    """Post-GELU MLP activations of `layer` as float16 rows (B·L, F); later layers are dead code."""
    _, acts = transformer.apply(params, tokens_BxL, cfg, capture_layers=(layer,))
    return acts[layer].reshape(-1, cfg.d_mlp).astype(jnp.float16)


_jit_layer_acts = jax.jit(_layer_acts, static_argnums=(2, 3))


def byte_lm(
    params: Any,
    cfg: TransformerConfig,
    tokens_N: np.ndarray,
    layer: int,
    out: str | os.PathLike,
    max_tokens: int | None = None,
    batch_size: int = 64,
    shard_rows: int | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[ActivationStore, dict[str, float]]:
    """Run the model over windows of the corpus and store layer `layer`'s MLP activations (float16).

    The corpus is cut into ⌊N / L⌋ non-overlapping windows of L = context_len tokens; when
    `max_tokens` asks for fewer, ⌈max_tokens / L⌉ windows evenly spaced over the corpus are used
    and the rows are cut to exactly `max_tokens`. Row w·L + t is position t of window w.
    """
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    L = cfg.context_len
    tokens_N = np.asarray(tokens_N, np.int32)
    available = len(tokens_N) // L
    if available == 0:
        raise ValueError(f"corpus has {len(tokens_N)} tokens, fewer than one window of {L}")
    n_rows = available * L if max_tokens is None else min(int(max_tokens), available * L)
    if n_rows <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    n_windows = math.ceil(n_rows / L)
    starts_W = (np.arange(n_windows) * available // n_windows) * L
    meta = {"kind": "harvest", "layer": layer, "context_len": L, "windows": n_windows, **(source or {})}
    writer = StoreWriter(out, cfg.d_mlp, shard_rows, "float16", meta, overwrite)

    def dispatch(j: int) -> tuple[jax.Array, slice]:
        idx_B = starts_W[j * batch_size : (j + 1) * batch_size]
        windows_BxL = np.zeros((batch_size, L), np.int32)  # fixed shape: one compilation
        windows_BxL[: len(idx_B)] = tokens_N[idx_B[:, None] + np.arange(L)]
        return _jit_layer_acts(params, jnp.asarray(windows_BxL), cfg, layer), slice(0, len(idx_B) * L)

    return _pipelined(dispatch, math.ceil(n_windows / batch_size), writer, n_rows,
                      f"harvest layer {layer}", progress)


# ----------------------------------------------------------------------------- MiniLM


def minilm_sequences(text: str, context_len: int = 128) -> list[list[int]]:
    """The corpus as MiniLM inputs: each paragraph (blank-line separated) in WordPiece tokens, cut into
    consecutive pieces of at most context_len − 2 tokens, each as [CLS] piece [SEP]."""
    from sae_jax.models import minilm

    if context_len < 3:
        raise ValueError(f"context_len must be at least 3 ([CLS] x [SEP]), got {context_len}")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    cls, sep = (minilm.tokenizer().token_to_id(t) for t in ("[CLS]", "[SEP]"))
    step = context_len - 2
    return [[cls, *ids[i : i + step], sep]
            for ids in minilm.encode_plain(paragraphs) for i in range(0, len(ids), step)]


def pack(seqs: list[list[int]], context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-fit packing in corpus order: (ids, segment ids), int32 (R, context_len); segment 0 = padding.

    Each row holds consecutive sequences as segments 1, 2, …; reading the real tokens row by row
    gives the sequences back in order.
    """
    rows: list[list[list[int]]] = [[]]
    for s in seqs:
        if sum(map(len, rows[-1])) + len(s) > context_len:
            rows.append([])
        rows[-1].append(s)
    ids = np.zeros((len(rows), context_len), np.int32)
    seg = np.zeros((len(rows), context_len), np.int32)
    for r, row in enumerate(rows):
        flat = [t for s in row for t in s]
        ids[r, : len(flat)] = flat
        seg[r, : len(flat)] = np.repeat(np.arange(1, len(row) + 1), [len(s) for s in row])
    return ids, seg


def _minilm_layer(params: Any, ids_BxT: jax.Array, seg_BxT: jax.Array, cfg: Any, layer: int) -> jax.Array:
    from sae_jax.models import minilm

    acts = minilm.apply(params, ids_BxT, seg_BxT > 0, cfg, segment_ids_BxT=seg_BxT)[f"mlp_{layer}"]
    return acts.reshape(-1, cfg.d_mlp).astype(jnp.float16)


_jit_minilm_layer = jax.jit(_minilm_layer, static_argnums=(3, 4))


def minilm(
    text: str,
    layer: int,
    out: str | os.PathLike,
    max_tokens: int | None = None,
    context_len: int = 128,
    batch_size: int = 32,
    shard_rows: int | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model: tuple[Any, Any] | None = None,
) -> tuple[ActivationStore, dict[str, float]]:
    """Store MiniLM's post-GELU MLP activations of block `layer` (float16), one row per real token.

    Sequences come from `minilm_sequences`, in corpus order; [CLS] and [SEP] are stored, padding is
    not. Short sequences are packed several to a row of context_len tokens (`pack`), each
    attending only to itself with its own positions, so a token's activations are those of its
    sequence run alone. When `max_tokens` asks for fewer tokens than the corpus holds, sequences
    evenly spaced over the corpus are used and the rows cut to exactly `max_tokens`. `model` is
    (params, config) from `minilm.load()` (loaded here when None).
    """
    from sae_jax.models import minilm as mm

    params, cfg = model if model is not None else mm.load()
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    if not 3 <= context_len <= cfg.max_len:
        raise ValueError(f"context_len must be in 3..{cfg.max_len}, got {context_len}")
    seqs = minilm_sequences(text, context_len)
    total = sum(len(s) for s in seqs)
    if total == 0:
        raise ValueError("the corpus has no tokens")
    n_rows = total if max_tokens is None else min(int(max_tokens), total)
    if n_rows <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if n_rows < total:  # evenly spaced sequences, a little more than needed, then cut
        n_pick = min(len(seqs), math.ceil(len(seqs) * n_rows / total * 1.05) + 1)
        seqs = [seqs[i] for i in np.arange(n_pick) * len(seqs) // n_pick]
        n_rows = min(n_rows, sum(len(s) for s in seqs))
    ids_RxT, seg_RxT = pack(seqs, context_len)
    meta = {"kind": "harvest", "model": mm.MODEL_NAME, "layer": layer,
            "hook_name": f"encoder.layer.{layer}.intermediate", "context_len": context_len,
            "sequences": len(seqs), "packed_rows": len(ids_RxT), **(source or {})}
    writer = StoreWriter(out, cfg.d_mlp, shard_rows, "float16", meta, overwrite)

    def dispatch(j: int) -> tuple[jax.Array, np.ndarray]:
        ids_BxT = np.zeros((batch_size, context_len), np.int32)  # fixed shape: one compilation
        seg_BxT = np.zeros((batch_size, context_len), np.int32)
        chunk = slice(j * batch_size, (j + 1) * batch_size)
        ids_BxT[: len(ids_RxT[chunk])] = ids_RxT[chunk]
        seg_BxT[: len(seg_RxT[chunk])] = seg_RxT[chunk]
        acts = _jit_minilm_layer(params, jnp.asarray(ids_BxT), jnp.asarray(seg_BxT), cfg, layer)
        return acts, seg_BxT.reshape(-1) > 0

    return _pipelined(dispatch, math.ceil(len(ids_RxT) / batch_size), writer, n_rows,
                      f"harvest MiniLM layer {layer}", progress)
