"""Harvest throughput: tokens/s and achieved GFLOP/s against a matmul roofline, in one run.

Three numbers, all on this machine, in this process:
  1. forward:  the jitted harvest forward (embeddings, blocks 0..layer; later blocks and the
     unembedding are dead code) on a (batch, context_len) token array. Achieved GFLOP/s =
     `transformer.forward_flops(cfg, batch, L, through_layer=layer)` / median time.
  2. roofline: every matmul of that forward, each shape jitted alone on random inputs and timed
     the same way; roofline GFLOP/s = Σ matmul FLOPs / Σ matmul times. It is the speed the
     forward would reach if it were nothing but its matmuls at this backend's matmul speed.
  3. harvest:  `harvest.byte_lm` end to end (windows from the corpus, device→host copy,
     float16 shards on disk) in tokens/s.

    python benchmarks/harvest_throughput.py [--model DIR] [--layer 1] [--batch-size 64] [--max-tokens 131072]

Without --model the preset's architecture is initialised at random: the cost does not depend on
the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import harvest, lm, transformer


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_shapes(cfg: transformer.TransformerConfig, batch: int, layer: int) -> list[tuple[int, ...]]:
    """(count, batch size, m, k, n) of each matmul in the harvest forward through `layer`.

    Their FLOPs sum to `transformer.forward_flops(cfg, batch, L, through_layer=layer)`.
    """
    T, D, F = batch * cfg.context_len, cfg.d_model, cfg.d_mlp
    L, H, K = cfg.context_len, cfg.n_heads, cfg.d_head
    n = layer + 1
    return [
        (n, 1, T, D, 3 * D),  # qkv
        (n, batch * H, L, K, L),  # scores
        (n, batch * H, L, L, K),  # mixing
        (n, 1, T, D, D),  # attention output
        (n, 1, T, D, F),  # MLP in
        (n - 1, 1, T, F, D),  # MLP out (not needed in the harvested layer itself)
    ]


def roofline(cfg: transformer.TransformerConfig, batch: int, layer: int, repeats: int) -> tuple[float, float]:
    """(Σ FLOPs, Σ seconds) of the forward's matmuls, each jitted and timed alone."""
    mm = jax.jit(lambda a, b: jnp.matmul(a, b))
    key = jax.random.key(0)
    flops = seconds = 0.0
    for count, nb, m, k, n in matmul_shapes(cfg, batch, layer):
        if count == 0:
            continue
        a = jax.random.normal(key, (nb, m, k), jnp.float32)
        b = jax.random.normal(key, (nb, k, n), jnp.float32)
        flops += count * 2 * nb * m * k * n
        seconds += count * _median_seconds(mm, a, b, repeats=repeats)
    return flops, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a train-lm output directory (default: random weights)")
    ap.add_argument("--preset", default="cpu", choices=sorted(lm.MODEL_PRESETS))
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=131072, help="rows for the end-to-end harvest")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if args.model:
        params, cfg = lm.load_model(args.model)
    else:
        cfg = lm.MODEL_PRESETS[args.preset][0]
        params = transformer.init(jax.random.key(0), cfg)
    B, L = args.batch_size, cfg.context_len
    tokens_N = lm.encode(lm.default_corpus())
    windows_BxL = jnp.asarray(tokens_N[: B * L].reshape(B, L).astype(np.int32))

    fwd = lambda p, t: harvest._jit_layer_acts(p, t, cfg, args.layer)  # noqa: E731
    fwd_s = _median_seconds(fwd, params, windows_BxL, repeats=args.repeats)
    fwd_flops = transformer.forward_flops(cfg, B, L, through_layer=args.layer)
    mm_flops, mm_s = roofline(cfg, B, args.layer, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        store, stats = harvest.byte_lm(params, cfg, tokens_N, args.layer, os.path.join(tmp, "store"),
                                           max_tokens=args.max_tokens, batch_size=B, progress=False)
    result = {
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "model": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "context_len": L},
        "layer": args.layer,
        "batch_size": B,
        "forward_tokens_per_s": B * L / fwd_s,
        "forward_gflops": fwd_flops / 1e9,
        "forward_gflop_per_s": fwd_flops / fwd_s / 1e9,
        "matmul_roofline_gflop_per_s": mm_flops / mm_s / 1e9,
        "fraction_of_roofline": (fwd_flops / fwd_s) / (mm_flops / mm_s),
        "harvest_tokens_per_s": stats["tokens_per_s"],
        "harvest_rows": store.n,
    }
    print(
        f"{result['device']} ({result['cpu_count']} cores, load {result['load_avg_1min']:.1f}); "
        f"{cfg.n_layers}L d{cfg.d_model} F{cfg.d_mlp} L{L}, harvest layer {args.layer}, batch {B}\n"
        f"forward:  {result['forward_tokens_per_s']:>12,.0f} tokens/s  "
        f"{result['forward_gflop_per_s']:7.1f} GFLOP/s\n"
        f"roofline: {'':>12} {'':9} {result['matmul_roofline_gflop_per_s']:7.1f} GFLOP/s (same matmul shapes)"
        f"  -> {100 * result['fraction_of_roofline']:.0f}% of roofline\n"
        f"harvest:  {result['harvest_tokens_per_s']:>12,.0f} tokens/s end to end "
        f"({store.n:,} rows to float16 shards)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
