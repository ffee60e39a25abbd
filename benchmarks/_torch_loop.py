"""The PyTorch baseline of benchmarks/grid_step.py: the same cells trained one after another, as
SAE libraries do, in float32 and under bfloat16 autocast (float32 weights and Adam)."""

from __future__ import annotations

import time

import numpy as np


def step_seconds(d: int, sizes: list[int], alphas: list[float], batch: int, steps: int,
                 autocast: bool, repeats: int = 2) -> float | None:
    """Median seconds per grid step (every cell once), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    xs = torch.randn(steps, batch, d, device=dev) / d ** 0.5
    cells = []
    for m in sizes:
        for a in alphas:
            w_enc = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(m, d, device=dev)))
            b_enc = torch.nn.Parameter(torch.zeros(m, device=dev))
            dec = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(m, d, device=dev)))
            cells.append((float(a), (w_enc, b_enc, dec),
                          torch.optim.Adam([w_enc, b_enc, dec], lr=1e-3)))

    def step(a, params, opt, x):
        w_enc, b_enc, dec = params
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=autocast):
            c = torch.relu(x @ w_enc.T + b_enc)
            x_hat = c @ (dec / dec.norm(dim=1, keepdim=True))
            loss = ((x - x_hat.float()) ** 2).mean() + a * c.float().abs().sum(-1).mean() / c.shape[-1]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run():
        for a, params, opt in cells:
            for t in range(steps):
                step(a, params, opt, xs[t])
        if dev == "cuda":
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / steps


def gemm_rate(n: int, dtype_name: str, repeats: int = 5) -> float | None:
    """GFLOP/s of one n x n x n PyTorch matmul in float32 or bfloat16 (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9
