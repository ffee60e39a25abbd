"""SynthSAEBench worlds from SAELens's files and configurations: `load_saelens`, `from_config`,
`preset`.

Both read SAELens's `SyntheticModelConfig.to_dict()` JSON. SAELens draws every random quantity
of a seeded model from its own torch generator (`torch.Generator().manual_seed(s)`, CPU
`torch.randn`: MT19937 and Box-Muller over 16-number blocks); `torch_randn` replays that stream
with numpy alone (equal to torch's to one float32 ulp), so the quantities below match SAELens's
for the same seed without torch:

- feature vectors and bias: randn(F, D) then randn(D) from seed s, rows normalised, the bias
  scaled to norm `bias`; then SAELens's orthogonalisation, Adam (lr, num_steps) on
  sum_{i != j} (w_i . w_j)^2 + F sum_i (|w_i|^2 - 1)^2, rows renormalised (run here in JAX
  with the D x D Gram matrix, so equal to SAELens's up to float32 rounding, not bit for bit);
- correlation factor: randn(F, R) from s + 4, times the scale, rows with |l_f|^2 > 0.99 capped
  to 0.99, c_f = 1 - |l_f|^2;
- magnitudes: std from s + 1, mean from s + 2 (folded normal |m + s randn|, linear, exponential,
  constant);
- hierarchy: SAELens's breadth-first forest (`random.Random(s + 3)` for branching ranges and the
  mutually exclusive portion) and its probability compensation (p_f / p_parent times
  1 + sum of the siblings' p / p_parent in exclusive groups, clamped to 1).

Without a seed SAELens draws from torch's global generator; here seed 0's stream stands in.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import st
from sae_jax.synth_world import SynthWorld, make_world

CONFIG_FILE = "synthetic_model_config.json"
WEIGHTS_FILE = "synthetic_model.safetensors"
HIERARCHY_FILE = "hierarchy.json"


# ------------------------------------------------------------------------- torch's generator
def torch_randn(sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Consecutive `torch.randn(n)` calls (CPU, float32, n >= 16 each) on
    `torch.Generator().manual_seed(seed)`, in numpy: u_i = (MT19937 output & (2^24 - 1)) 2^-24;
    each block of 16 uniforms becomes sqrt(-2 log(1 - u_k)) (cos, sin)(2 pi u_{k+8}), k < 8; a
    call with n mod 16 != 0 redoes its last 16 numbers from 16 more uniforms. Equal to torch's
    to one float32 ulp (checked by tests/fixtures/make_synth_fixture.py)."""
    if any(n < 16 for n in sizes) or not 0 <= seed < 2 ** 32:
        raise ValueError("torch_randn replays torch only for n >= 16 and 0 <= seed < 2^32")
    used = [n + (16 if n % 16 else 0) for n in sizes]
    raw = np.frombuffer(np.random.RandomState(seed).bytes(4 * sum(used)), dtype="<u4")
    u_all = (raw & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)
    out, at = [], 0
    for n, m in zip(sizes, used):
        u = u_all[at: at + m]
        at += m
        blocks = np.concatenate([u[: n - n % 16], u[n:]]).reshape(-1, 16)
        r = np.sqrt(np.float32(-2) * np.log(np.float32(1) - blocks[:, :8]))
        th = np.float32(2 * np.pi) * blocks[:, 8:]
        z = np.concatenate([r * np.cos(th), r * np.sin(th)], axis=1).reshape(-1)
        out.append(z if n % 16 == 0 else np.concatenate([z[: n - 16], z[-16:]]))
    return out


def _randn(*shapes: tuple[int, ...], seed: int | None) -> list[np.ndarray]:
    """Consecutive torch.randn(shape) draws from one seeded generator (seed None: 0)."""
    zs = torch_randn(tuple(int(np.prod(s)) for s in shapes), 0 if seed is None else seed)
    return [z.reshape(s) for z, s in zip(zs, shapes)]


# ----------------------------------------------------------------- configured distributions
def magnitudes(spec: float | dict[str, Any], f: int, seed: int | None) -> np.ndarray:
    """SAELens's `generate_magnitudes`: a constant, or a config dict by `generator_name`."""
    if not isinstance(spec, dict):
        return np.full(f, float(spec), np.float32)
    name = spec["generator_name"]
    if name == "constant":
        return np.full(f, float(spec.get("value", 1.0)), np.float32)
    t = np.linspace(0.0, 1.0, f) if f > 1 else np.zeros(1)
    if name == "linear":
        return (spec["start"] + (spec["end"] - spec["start"]) * t).astype(np.float32)
    if name == "exponential":
        return (spec["start"] * (spec["end"] / spec["start"]) ** t).astype(np.float32)
    if name == "folded_normal":
        g = _randn((f,), seed=seed)[0]
        z = np.abs(np.float32(spec.get("mean", 0.0)) + g * np.float32(spec.get("std", 0.1)))
        lo, hi = spec.get("min_value"), spec.get("max_value")
        return np.clip(z, lo, hi) if lo is not None or hi is not None else z
    raise ValueError(f"unknown magnitude generator {name!r}")


def firing_probabilities(spec: dict[str, Any], f: int, seed: int | None) -> np.ndarray:
    """SAELens's firing-probability generators (zipfian, linear, constant)."""
    name = spec["generator_name"]
    if name == "zipfian":
        lo, hi = spec.get("min_prob", 0.01), spec.get("max_prob", 0.3)
        z = 1.0 / np.arange(1, f + 1, dtype=np.float32) ** np.float32(spec.get("exponent", 1.0))
        return (lo + (hi - lo) * (z - z.min()) / (z.max() - z.min())).astype(np.float32)
    if name == "linear":
        return np.linspace(spec.get("max_prob", 0.3), spec.get("min_prob", 0.01), f).astype(np.float32)
    if name == "constant":
        return np.full(f, spec.get("probability", 0.1), np.float32)
    raise ValueError(f"firing probabilities {name!r} are not supported (random: torch.rand)")


def generate_hierarchy(f: int, cfg: dict[str, Any], seed: int | None) -> list[dict[str, Any]]:
    """SAELens's `generate_hierarchy` as `to_dict` trees: `total_root_nodes` roots, each node
    above `max_depth` given `branching_factor` children, features numbered breadth-first; a
    `mutually_exclusive_portion` of the eligible parents (depth in range, >= 2 children) chosen
    by `random.Random(seed)` get exclusive children."""
    rng = random.Random(seed)
    nxt = iter(range(f))

    def node(fi: int) -> dict[str, Any]:
        return {"feature_index": fi, "mutually_exclusive_children": False,
                "scale_children_by_parent": False, "feature_id": None, "children": []}

    roots = [node(fi) for _, fi in zip(range(cfg["total_root_nodes"]), nxt)]
    parents = [(r, 0) for r in roots]
    level = list(parents)
    bf = cfg["branching_factor"]
    while level:
        nxt_level = []
        for par, depth in level:
            if depth >= cfg["max_depth"]:
                continue
            k = bf if isinstance(bf, int) else rng.randint(bf[0], bf[1])
            for _, fi in zip(range(k), nxt):
                child = node(fi)
                par["children"].append(child)
                if depth + 1 < cfg["max_depth"]:
                    nxt_level.append((child, depth + 1))
                    parents.append((child, depth + 1))
        level = nxt_level
    lo, hi = cfg.get("mutually_exclusive_min_depth", 0), cfg.get("mutually_exclusive_max_depth")
    eligible = [n for n, d in parents if d >= lo and (hi is None or d <= hi) and len(n["children"]) >= 2]
    k = int(len(eligible) * cfg.get("mutually_exclusive_portion", 0.0))
    for i in (rng.sample(range(len(eligible)), k) if k > 0 else []):
        eligible[i]["mutually_exclusive_children"] = True
    if cfg.get("scale_children_by_parent"):
        for n, _ in parents:
            n["scale_children_by_parent"] = True
    return roots


def compensate(p_F: np.ndarray, roots: list[dict[str, Any]]) -> np.ndarray:
    """SAELens's hierarchy compensation: p_f / p_parent, times 1 + (sum of the other children's
    p) / p_parent in exclusive groups, clamped to 1 (p the uncompensated probabilities)."""
    factor = np.ones_like(p_F)

    def walk(n: dict[str, Any], parent_p: float) -> None:
        fi = n.get("feature_index")
        if fi is not None and parent_p > 0:
            factor[fi] = 1.0 / parent_p
        p = float(p_F[fi]) if fi is not None else parent_p
        kids = n.get("children") or []
        for c in kids:
            walk(c, p)
        ks = [c["feature_index"] for c in kids if c.get("feature_index") is not None]
        if n.get("mutually_exclusive_children") and len(kids) >= 2 and len(ks) >= 2 and p > 0:
            total = sum(float(p_F[k]) for k in ks)
            for k in ks:
                factor[k] *= 1.0 + max(0.0, total - float(p_F[k])) / p

    for r in roots:
        walk(r, 1.0)
    return np.minimum(p_F * factor, 1.0).astype(np.float32)


@jax.jit
def _orthogonalize(w_FxD: jax.Array, lr: float, steps_mask: jax.Array) -> jax.Array:
    """SAELens's `orthogonalize_embeddings`: Adam on sum_{i!=j} G_ij^2 + F sum_i (G_ii - 1)^2,
    G = W W^T, whose gradient G W = W (W^T W) needs no F x F matrix."""
    f = w_FxD.shape[0]

    def grad(w):  # 4 W (W^T W) - 4 G_ii w_i + 4 F (G_ii - 1) w_i: two F x D x D matmuls
        gii = jnp.sum(w * w, axis=1, keepdims=True)
        return 4.0 * (w @ (w.T @ w)) + 4.0 * (f * (gii - 1.0) - gii) * w

    opt = optax.adam(lr)
    w = w_FxD / jnp.maximum(jnp.linalg.norm(w_FxD, axis=1, keepdims=True), 1e-8)

    def step(carry, _):
        w, s = carry
        upd, s = opt.update(grad(w), s, w)
        return (optax.apply_updates(w, upd), s), None

    (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), steps_mask)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-8)


def _correlation(cfg: dict[str, Any], seed: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """SAELens's `generate_random_low_rank_correlation_matrix`: L = scale randn(F, R), rows with
    |l_f|^2 > 0.99 scaled to 0.99, c_f = 1 - |l_f|^2; (None, None) without a copula."""
    corr = cfg.get("correlation")
    if not corr:
        return None, None
    lf = _randn((int(cfg["num_features"]), int(corr["rank"])), seed=seed)[0]
    lf = lf * np.float32(corr.get("correlation_scale", 0.1))
    ss = (lf ** 2).sum(1)
    cap = ss > 0.99
    lf[cap] *= np.sqrt(0.99 / ss[cap])[:, None]
    return lf, 1.0 - (lf ** 2).sum(1)


def _forest(cfg: dict[str, Any], seed: int | None) -> list[dict[str, Any]]:
    h = cfg.get("hierarchy")
    return generate_hierarchy(int(cfg["num_features"]), h, seed) if h and h.get("total_root_nodes", 0) else []


# ------------------------------------------------------------------------------ public API
def from_config(cfg: dict[str, Any], orthogonalize: bool = True,
                probs_F: np.ndarray | None = None) -> SynthWorld:
    """The world SAELens's `SyntheticModel(SyntheticModelConfig.from_dict(cfg))` builds (module
    docstring). `orthogonalize=False` skips the orthogonalisation (nothing but W depends on it);
    `probs_F` replaces the firing probabilities (SAELens's load does so with the saved ones)."""
    f, d, seed = int(cfg["num_features"]), int(cfg["hidden_dim"]), cfg.get("seed")
    off = (lambda k: None) if seed is None else (lambda k: seed + k)
    roots = _forest(cfg, off(3))
    if probs_F is None:
        probs_F = firing_probabilities(cfg["firing_probability"], f, seed)
        if roots and cfg["hierarchy"].get("compensate_probabilities"):
            probs_F = compensate(probs_F, roots)
    w, b = _randn((f, d), (d,), seed=seed)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-8)
    bias = np.zeros(d, np.float32)
    if cfg.get("bias", 1.0):
        bias = b / max(np.linalg.norm(b), 1e-8) * (1.0 if cfg["bias"] is True else float(cfg["bias"]))
    ortho = cfg.get("orthogonalization")
    if ortho and orthogonalize:
        w = np.asarray(_orthogonalize(jnp.asarray(w), float(ortho.get("lr", 0.01)),
                                      jnp.zeros(int(ortho.get("num_steps", 200)))))
    lf, cd = _correlation(cfg, off(4))
    return make_world(w, bias, probs_F,
                      magnitudes(cfg.get("mean_firing_magnitudes", 1.0), f, off(2)),
                      magnitudes(cfg.get("std_firing_magnitudes", 0.0), f, off(1)), lf, cd, roots)


def load_saelens(path: str | Path) -> SynthWorld:
    """A model saved by SAELens's `SyntheticModel.save(path)`: config JSON, safetensors
    (`feature_vectors`, `bias`, `firing_probabilities`, optional `correlation_factor` and
    `correlation_diag`) and optional `hierarchy.json`, read with numpy. SAELens does not save
    the magnitude means and stds; its load redraws them from the config (std from seed + 1, mean
    from seed + 2); so does this, with `torch_randn` (torch's own numbers for a seeded config).
    A missing hierarchy or copula that the config asks for is regenerated, as SAELens does."""
    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    t = st.load(path / WEIGHTS_FILE)
    f, seed = int(cfg["num_features"]), cfg.get("seed")
    off = (lambda k: None) if seed is None else (lambda k: seed + k)
    if (path / HIERARCHY_FILE).exists():
        roots = json.loads((path / HIERARCHY_FILE).read_text())["roots"]
    else:  # SAELens's load regenerates what it does not find
        roots = _forest(cfg, off(3))
    if "correlation_factor" in t:
        lf, cd = np.asarray(t["correlation_factor"]), np.asarray(t["correlation_diag"])
    else:
        lf, cd = _correlation(cfg, off(4))
    return make_world(np.asarray(t["feature_vectors"]), np.asarray(t["bias"]),
                      np.asarray(t["firing_probabilities"]),
                      magnitudes(cfg.get("mean_firing_magnitudes", 1.0), f, off(2)),
                      magnitudes(cfg.get("std_firing_magnitudes", 0.0), f, off(1)), lf, cd, roots)


SYNTH_16K: dict[str, Any] = {
    "num_features": 16_384, "hidden_dim": 768,
    "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4},
    "hierarchy": {"total_root_nodes": 128, "branching_factor": 4, "max_depth": 3,
                  "mutually_exclusive_portion": 1.0, "mutually_exclusive_min_depth": 0,
                  "mutually_exclusive_max_depth": None, "compensate_probabilities": True,
                  "scale_children_by_parent": True},
    "orthogonalization": {"num_steps": 100, "lr": 3e-4, "chunk_size": 1024},
    "correlation": {"rank": 25, "correlation_scale": 0.1, "seed": None},
    "mean_firing_magnitudes": {"generator_name": "linear", "start": 5.0, "end": 4.0},
    "std_firing_magnitudes": {"generator_name": "folded_normal", "mean": 0.5, "std": 0.5,
                              "min_value": None, "max_value": None},
    "bias": 0.5, "dtype": "float32", "seed": 42,
}
# The same shape on a CPU budget: 4,096 features in 256 dimensions, 32 roots.
SYNTH_SMALL: dict[str, Any] = {**copy.deepcopy(SYNTH_16K), "num_features": 4096, "hidden_dim": 256,
                               "hierarchy": {**SYNTH_16K["hierarchy"], "total_root_nodes": 32}}
PRESETS = {"synth-16k": SYNTH_16K, "synth-small": SYNTH_SMALL}


def preset_config(name: str, seed: int = 42) -> dict[str, Any]:
    """The SAELens config dict of a preset with its seed (42: the docs' SynthSAEBench-16k)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), "seed": int(seed)}


def preset(name: str, seed: int = 42, orthogonalize: bool = True) -> SynthWorld:
    """A fresh draw of a published configuration: "synth-16k" (SynthSAEBench-16k's, SAELens docs:
    Zipf 0.5, p 0.4 -> 5e-4, 128 roots x branching 4 x depth 3, all children mutually exclusive
    and scaled by their parent, copula rank 25 scale 0.1, orthogonalisation 100 steps lr 3e-4,
    magnitudes 5 -> 4 with folded-normal (0.5, 0.5) stds, bias 0.5) or "synth-small" (4,096
    features in 256 dimensions, 32 roots, otherwise the same). Not the Hugging Face file: with
    seed 42, SAELens's construction up to the orthogonalisation's float32 rounding."""
    return from_config(preset_config(name, seed), orthogonalize=orthogonalize)
