"""Every cell's full weights, a trained SAE in three lines, and export to SAELens and dictionary_learning.

`weights.safetensors`, written by every run beside `dictionaries.npz`, holds for each cell i
(float32; readable with numpy alone via `sae_jax.st`, or with the `safetensors` package):

    cell_{i}.W_enc        (m, d)   encoder rows, c = ReLU(x W_encᵀ + b_enc)
    cell_{i}.b_enc        (m,)
    cell_{i}.D            (m, d)   decoder rows as stored (the trained parameter)
    cell_{i}.D_unit       (m, d)   D with unit rows: x̂ = c D_unit (what the forward pass uses)
    cell_{i}.firing_freq  (m,)     fraction of the evaluation batch on which latent j fired (c_j > 0)

and string metadata: format "sae_jax.weights/1", n_cells, d, and the cells' (l1, dict_size, seed).

    params, encode, decode = export.load_cell("runs/grid", 3)
    x_hat = decode(encode(x))                        # jitted; x is (..., d)

Exports compute exactly this reconstruction, ReLU(x W_enc + b_enc) W_dec + b_dec:
- SAELens 6.x (`saelens`): cfg.json (architecture "standard", apply_b_dec_to_input false,
  normalize_activations "none"), sae_weights.safetensors {W_enc (d, m), W_dec (m, d) unit rows,
  b_enc (m,), b_dec (d,) zeros}, sparsity.safetensors {sparsity: log10(firing_freq + 1e-10)}.
  Load with `sae_lens.SAE.load_from_disk(DIR)`.
- dictionary_learning (`dictionary-learning`): ae.safetensors with AutoEncoderNew's state dict
  {encoder.weight (m, d), encoder.bias (m,), decoder.weight (d, m) = D_unitᵀ, decoder.bias (d,) zeros}
  and config.json {"trainer": {"dict_class": "AutoEncoderNew", "activation_dim", "dict_size", ...}}.
  Load with `ae = AutoEncoderNew(d, m); ae.load_state_dict(safetensors.torch.load_file(DIR/ae.safetensors))`,
  or save that state dict as DIR/ae.pt for `dictionary_learning.utils.load_dictionary(DIR)`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae, st
from sae_jax.errors import UsageError

WEIGHTS = "weights.safetensors"
FORMAT = "sae_jax.weights/1"
FORMATS = ("saelens", "dictionary-learning")
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written here is SAELens >= 6's
_FIELDS = ("W_enc", "b_enc", "D", "D_unit", "firing_freq")


@jax.jit
def _firing_freq(params: sae.SAEParams, x_NxD: jax.Array) -> jax.Array:
    return jnp.mean((sae.encode(params, x_NxD) > 0).astype(jnp.float32), axis=0)


def write_weights(out_dir: str | os.PathLike, state, spec, x_eval: jax.Array | None = None) -> Path:
    """Write every cell's weights (and, given an evaluation batch, firing frequencies) to OUT/weights.safetensors."""
    from sae_jax import grid, sharding

    path = Path(out_dir) / WEIGHTS
    if jax.process_index() != 0:
        return path
    state = sharding.gather_to_host(state)
    tensors: dict[str, np.ndarray] = {}
    cells = spec.cells()
    for c in cells:
        p = grid.cell_params(state, c)
        tensors[f"cell_{c.index}.W_enc"] = np.asarray(p.W_enc_MxD, np.float32)
        tensors[f"cell_{c.index}.b_enc"] = np.asarray(p.b_enc_M, np.float32)
        tensors[f"cell_{c.index}.D"] = np.asarray(p.D_MxD, np.float32)
        tensors[f"cell_{c.index}.D_unit"] = np.asarray(sae.dictionary(p), np.float32)
        if x_eval is not None:
            tensors[f"cell_{c.index}.firing_freq"] = np.asarray(_firing_freq(p, jnp.asarray(x_eval, jnp.float32)))
    d = int(tensors[f"cell_{cells[0].index}.W_enc"].shape[1])
    meta = {"format": FORMAT, "n_cells": str(len(cells)), "d": str(d),
            "cells": json.dumps([{"index": c.index, "l1": c.l1_coeff, "dict_size": c.dict_size, "seed": c.seed}
                                 for c in cells])}
    os.makedirs(out_dir, exist_ok=True)
    st.save(path, tensors, meta)
    return path


def read_cell(run_dir: str | os.PathLike, cell: int) -> dict[str, np.ndarray]:
    """Cell `cell`'s arrays from RUN_DIR/weights.safetensors: W_enc, b_enc, D, D_unit and, when written, firing_freq."""
    path = Path(run_dir).expanduser() / WEIGHTS
    if not path.is_file():
        raise UsageError(f"{path} not found (runs write it since sae_jax 0.1 with full weights; rerun the grid)")
    meta = st.metadata(path)
    n = int(meta.get("n_cells", 0))
    if not 0 <= cell < n:
        raise UsageError(f"--cell {cell} is out of range: the run has cells 0..{n - 1}")
    head, _ = st.header(path)
    names = [f"cell_{cell}.{f}" for f in _FIELDS if f"cell_{cell}.{f}" in head]
    return {k.split(".", 1)[1]: np.array(v) for k, v in st.load(path, names).items()}


def load_cell(run_dir: str | os.PathLike, cell: int) -> tuple[sae.SAEParams, Callable, Callable]:
    """(params, encode, decode) of one trained cell: encode(x) = ReLU(x W_encᵀ + b_enc), decode(c) = c D_unit, jitted."""
    w = read_cell(run_dir, cell)
    params = sae.SAEParams(jnp.asarray(w["W_enc"]), jnp.asarray(w["b_enc"]), jnp.asarray(w["D"]))
    encode = jax.jit(functools.partial(sae.encode, params))
    decode = jax.jit(functools.partial(sae.decode, params))
    return params, encode, decode


def _provenance(run_dir: Path) -> dict:
    """model_name / hook_name when the run's activations came from a harvested store that records them."""
    try:
        cfg = json.loads((run_dir / "results.json").read_text()).get("config", {})
        src = cfg.get("activations")
        manifest = json.loads((Path(src) / "manifest.json").read_text()).get("source", {}) if src else {}
    except (OSError, ValueError):
        return {}
    out = {}
    if manifest.get("model"):
        out["model_name"] = manifest["model"]
    if manifest.get("hook_name"):
        out["hook_name"] = manifest["hook_name"]
    elif manifest.get("layer") is not None:
        out["hook_name"] = f"blocks.{manifest['layer']}.mlp.hook_post"
    return out


def _cell_info(run_dir: Path, cell: int) -> dict:
    try:
        cells = json.loads(st.metadata(run_dir / WEIGHTS).get("cells", "[]"))
    except ValueError:
        return {}
    return next((c for c in cells if c.get("index") == cell), {})


def export(run_dir: str | os.PathLike, cell: int, fmt: str, out: str | os.PathLike) -> Path:
    """Write cell `cell` of a run in `fmt` ("saelens" or "dictionary-learning") to directory `out`."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir).expanduser().absolute()
    w = read_cell(run_dir, cell)
    out = Path(out).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    m, d = w["W_enc"].shape
    info = {"run_dir": str(run_dir), "cell": cell, **_cell_info(run_dir, cell)}
    prov = _provenance(run_dir)
    if fmt == "saelens":
        meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None, **prov,
                "sae_jax": info}
        cfg = {"architecture": "standard", "d_in": int(d), "d_sae": int(m), "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": meta}
        st.save(out / "sae_weights.safetensors", {
            "W_enc": w["W_enc"].T, "W_dec": w["D_unit"], "b_enc": w["b_enc"], "b_dec": np.zeros(d, np.float32)})
        if "firing_freq" in w:
            st.save(out / "sparsity.safetensors", {"sparsity": np.log10(w["firing_freq"] + 1e-10).astype(np.float32)})
        (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    else:
        st.save(out / "ae.safetensors", {
            "encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"],
            "decoder.weight": np.ascontiguousarray(w["D_unit"].T), "decoder.bias": np.zeros(d, np.float32)})
        trainer = {"dict_class": "AutoEncoderNew", "trainer_class": "sae_jax", "activation_dim": int(d),
                   "dict_size": int(m), "l1_penalty": info.get("l1"), "seed": info.get("seed"),
                   "lm_name": prov.get("model_name"), "submodule_name": prov.get("hook_name"), "sae_jax": info}
        (out / "config.json").write_text(json.dumps({"trainer": trainer}, indent=2))
    return out
