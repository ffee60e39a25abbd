"""MiniLM forward GFLOP/s and harvest tokens/s against this machine's float32 matmul peak, in one run.

    python benchmarks/minilm_throughput.py [--layer 1] [--batch-size 32] [--context-len 128] [--max-tokens 65536]

1. peak:     a jitted 2048³ float32 jnp.dot, median of repeats (2·2048³ FLOPs each).
2. forward:  the full jitted MiniLM apply (6 blocks, every output) on B packed rows of T tokens of
             corpus text; FLOPs from XLA's cost analysis of the compiled forward.
3. harvest:  `harvest.minilm` end to end on the default corpus (tokenize, forward through the
             layer, device→host copy, padding dropped, float16 store writes).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from harvest_throughput import _median_seconds  # benchmarks/ is on sys.path when run as a script

from sae_jax import harvest, lm
from sae_jax.models import minilm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    peak = 2 * n**3 / _median_seconds(dot, a, a, repeats=args.repeats) / 1e9

    params, cfg = minilm.load()
    text = lm.default_corpus()
    ids, seg = harvest.pack(harvest.minilm_sequences(text, args.context_len), args.context_len)
    ids, seg = ids[: args.batch_size], seg[: args.batch_size]  # packed rows, as the harvest runs them
    mask = (seg > 0).astype(np.int32)
    compiled = minilm.forward.lower(params, ids, mask, cfg, seg).compile()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    fwd_s = _median_seconds(lambda i, m, s: minilm.forward(params, i, m, cfg, s), ids, mask, seg,
                            repeats=args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        store, stats = harvest.minilm(text, args.layer, os.path.join(tmp, "s"), max_tokens=args.max_tokens,
                                      context_len=args.context_len, batch_size=args.batch_size,
                                      progress=False, model=(params, cfg))
    result = {
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
        "matmul_peak_gflop_per_s": peak,
        "forward_batch": list(ids.shape), "forward_real_token_fraction": float(mask.mean()),
        "forward_gflops": flops / 1e9, "forward_seconds": fwd_s,
        "forward_gflop_per_s": flops / fwd_s / 1e9,
        "forward_fraction_of_peak": flops / fwd_s / 1e9 / peak,
        "forward_real_tokens_per_s": float(mask.sum()) / fwd_s,
        "harvest_layer": args.layer, "harvest_rows": store.n, "harvest_tokens_per_s": stats["tokens_per_s"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
