"""Every cell's full weights, a trained SAE in three lines, and export to SAELens and dictionary_learning.

`weights.safetensors`, written by every run beside `dictionaries.npz`, holds for each cell i
(float32; readable with numpy alone via `sae_jax.st`, or with the `safetensors` package):

    cell_{i}.W_enc        (m, d)   encoder rows: pre-activations p = (x - b_dec) W_encᵀ + b_enc
    cell_{i}.b_enc        (m,)
    cell_{i}.D            (m, d)   decoder rows as stored (the trained parameter)
    cell_{i}.D_unit       (m, d)   D with unit rows: x̂ = c D_unit + b_dec (what the forward pass uses)
    cell_{i}.b_dec        (d,)     the decoder bias: p = (x - b_dec) W_encᵀ + b_enc; absent when the
                                   run trained none (`--decoder-bias none`, the report's SAE)
    cell_{i}.threshold    (m,)     jumprelu: θ_j = exp(log θ_j); batchtopk: its inference threshold
                                   θ (the same for every latent); absent for relu_l1 and topk
    cell_{i}.firing_freq  (m,)     fraction of the evaluation batch on which latent j fired (c_j > 0)

and string metadata: format "sae_jax.weights/1", n_cells, d, and the cells' JSON list
(index, arch, l1, k, l0_coeff, dict_size, seed). Files without `arch` are relu_l1 cells.
The codes c of each architecture (`sae_jax.archs.encode`):

    relu_l1    c = ReLU(p)
    topk       c = ReLU(p) on each row's k largest p_j, 0 elsewhere
    batchtopk  c = p · [p > θ]        (the inference form)
    jumprelu   c = p · [p > θ_j]

    params, encode, decode = export.load_cell("runs/grid", 3)
    x_hat = decode(encode(x))                        # jitted; x is (..., d)

Exports compute exactly this reconstruction, c(x) W_dec + b_dec with W_dec = D_unit and b_dec the
cell's decoder bias (zeros when it has none), the encoder reading x - b_dec; each architecture's
record names its targets (`saelens_arch`, `saelens_config`, `dl_class`, `dictionary_learning`):
- SAELens 6.x (`saelens`): cfg.json (apply_b_dec_to_input true when the cell has a decoder bias,
  false otherwise; normalize_activations "none";
  architecture "standard" for relu_l1, "topk" with k and rescale_acts_by_decoder_norm true for
  topk (a no-op on unit rows; SAELens saves its own TopK SAEs so), "jumprelu" for jumprelu and
  batchtopk, as SAELens saves a trained BatchTopK SAE), sae_weights.safetensors {W_enc (d, m),
  W_dec (m, d) unit rows, b_enc (m,), b_dec (d,), and for jumprelu threshold (m,)},
  sparsity.safetensors {sparsity: log10(firing_freq + 1e-10)}. Load with
  `sae_lens.SAE.load_from_disk(DIR)`.
- dictionary_learning (`dictionary-learning`): ae.safetensors with the state dict of
  AutoEncoderNew (relu_l1: encoder.weight (m, d), encoder.bias, decoder.weight (d, m) = D_unitᵀ,
  decoder.bias = b_dec), AutoEncoderTopK (topk) or BatchTopKSAE (batchtopk) (encoder.*,
  decoder.weight, b_dec, k and threshold 0-d buffers: -1, unused, for topk, θ for
  batchtopk), JumpReluAutoEncoder (jumprelu: W_enc (d, m), b_enc, W_dec (m, d), b_dec,
  threshold (m,)). AutoEncoderNew and JumpReluAutoEncoder (with its default
  apply_b_dec_to_input False) do not subtract b_dec before the encoder, so their encoder bias is
  written with it folded in: b_enc - W_enc b_dec (the same pre-activations); config.json
  {"trainer": {"dict_class", "activation_dim", "dict_size", "k", ...}}.
  Load with `ae = CLASS(d, m[, k]); ae.load_state_dict(safetensors.torch.load_file(DIR/ae.safetensors))`,
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

from sae_jax import archs, sae, st
from sae_jax.architectures.base import decoder_bias
from sae_jax.errors import UsageError

WEIGHTS = "weights.safetensors"
FORMAT = "sae_jax.weights/1"
FORMATS = ("saelens", "dictionary-learning")
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written here is SAELens >= 6's
_FIELDS = ("W_enc", "b_enc", "D", "D_unit", "threshold", "firing_freq", "b_dec")


@functools.partial(jax.jit, static_argnums=2)
def _group_firing_freq(params: sae.SAEParams, x_NxD: jax.Array, arch: archs.Arch) -> jax.Array:
    """(C, m): each cell's fraction of samples on which each latent fires."""
    one = lambda p: jnp.mean((archs.encode(p, x_NxD, arch) > 0).astype(jnp.float32), axis=0)
    return jax.vmap(one)(params)


def write_weights(out_dir: str | os.PathLike, state, spec, x_eval: jax.Array | None = None) -> Path:
    """Write every cell's weights (thresholds for jumprelu and batchtopk; given an evaluation batch,
    firing frequencies of its architecture's codes) to OUT/weights.safetensors."""
    from sae_jax import results, sharding

    path = Path(out_dir) / WEIGHTS
    if jax.process_index() != 0:
        return path
    state = sharding.to_host(state)  # NumPy leaves: a cell's arrays are slices, not device calls
    units = results.dictionaries(state, spec)  # the same atoms as dictionaries.npz
    freqs = ([np.asarray(_group_firing_freq(g.params, jnp.asarray(x_eval, jnp.float32), g.arch))
              for g in state.groups] if x_eval is not None else None)
    tensors: dict[str, np.ndarray] = {}
    cells = spec.cells()
    for c in cells:
        g, name = state.groups[c.group], f"cell_{c.index}."
        p = jax.tree.map(lambda a: np.asarray(a[c.slot], np.float32), g.params)
        tensors[name + "W_enc"], tensors[name + "b_enc"], tensors[name + "D"] = p[:3]
        if p.b_dec_D is not None:
            tensors[name + "b_dec"] = p.b_dec_D
        tensors[name + "D_unit"] = np.asarray(units[c.index], np.float32)
        if c.arch_spec.has_threshold:
            tensors[name + "threshold"] = np.asarray(archs.threshold(p), np.float32)
        if freqs is not None:
            tensors[name + "firing_freq"] = freqs[c.group][c.slot]
    d = int(tensors[f"cell_{cells[0].index}.W_enc"].shape[1])
    meta = {"format": FORMAT, "n_cells": str(len(cells)), "d": str(d),
            "cells": json.dumps([{"index": c.index, "arch": c.arch, "l1": c.l1_coeff, "k": c.k,
                                  "l0_coeff": c.l0_coeff, "dict_size": c.dict_size, "seed": c.seed,
                                  **({"options": dict(c.arch_options)} if c.arch_options else {})}
                                 for c in cells])}
    os.makedirs(out_dir, exist_ok=True)
    st.save(path, tensors, meta)
    return path


def read_cell(run_dir: str | os.PathLike, cell: int) -> dict[str, np.ndarray]:
    """Cell `cell`'s arrays from RUN_DIR/weights.safetensors: W_enc, b_enc, D, D_unit and, when
    written, threshold, firing_freq and b_dec."""
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


def cell_arch(run_dir: str | os.PathLike, cell: int) -> archs.Arch:
    """Cell `cell`'s architecture from the weights file's metadata (relu_l1 when it records none)."""
    info = _cell_info(Path(run_dir).expanduser(), cell)
    name = info.get("arch", archs.DEFAULT)
    if name not in archs.names():
        raise UsageError(f"cell {cell} has architecture {name!r}; this sae_jax knows {', '.join(archs.names())}")
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in info.get("options", {}).items()))
    return archs.Arch(name, int(info.get("k", 0)) if archs.get(name).uses_k else 0, options)


def _read(run_dir: Path, cell: int) -> tuple[dict[str, np.ndarray], archs.Arch]:
    w, arch = read_cell(run_dir, cell), cell_arch(run_dir, cell)
    if arch.has_threshold and "threshold" not in w:
        raise UsageError(f"{run_dir / WEIGHTS} has no cell_{cell}.threshold for its {arch.name} cell")
    return w, arch


def load_cell(run_dir: str | os.PathLike, cell: int
              ) -> tuple[sae.SAEParams | sae.ThresholdSAEParams, Callable, Callable]:
    """(params, encode, decode) of one trained cell, jitted: encode(x) = `archs.encode` with the
    cell's architecture (ReLU(p), its top k, or p·[p > θ]), decode(c) = c D_unit + b_dec. Params
    are ThresholdSAEParams (log θ) for jumprelu and batchtopk, SAEParams otherwise."""
    w, arch = _read(Path(run_dir), cell)
    params = sae.SAEParams(jnp.asarray(w["W_enc"]), jnp.asarray(w["b_enc"]), jnp.asarray(w["D"]),
                           jnp.asarray(w["b_dec"]) if "b_dec" in w else None)
    if arch.has_threshold:
        params = sae.with_threshold(params, jnp.log(jnp.asarray(w["threshold"])))
    encode = jax.jit(lambda x: archs.encode(params, x, arch))
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
    except (OSError, ValueError):
        return {}
    return next((c for c in cells if c.get("index") == cell), {})


def _saelens(w: dict[str, np.ndarray], arch: archs.Arch, meta: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """SAELens's cfg.json and sae_weights.safetensors for one cell."""
    m, d = w["W_enc"].shape
    cfg = {"architecture": arch.record.saelens_arch, "d_in": int(d), "d_sae": int(m), "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": "b_dec" in w, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    tensors = {"W_enc": w["W_enc"].T, "W_dec": w["D_unit"], "b_enc": w["b_enc"], "b_dec": decoder_bias(w)}
    cfg.update(arch.record.saelens_config(arch))
    if arch.has_threshold:
        tensors["threshold"] = w["threshold"]
    return cfg, tensors


def export(run_dir: str | os.PathLike, cell: int, fmt: str, out: str | os.PathLike) -> Path:
    """Write cell `cell` of a run in `fmt` ("saelens" or "dictionary-learning") to directory `out`,
    in the target's form of the cell's architecture (see the module docstring)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir).expanduser().absolute()
    w, arch = _read(run_dir, cell)
    out = Path(out).expanduser().absolute()
    m, d = w["W_enc"].shape
    info = {"run_dir": str(run_dir), "cell": cell, **_cell_info(run_dir, cell)}
    prov = _provenance(run_dir)
    if fmt == "saelens":
        meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None, **prov,
                "sae_jax": info}
        cfg, tensors = _saelens(w, arch, meta)
    else:
        record = arch.record
        tensors = record.dictionary_learning(w, arch)
        setting = arch.k if record.uses_k else info.get(record.sparsity_key)
        trainer = {"dict_class": record.dl_class, "trainer_class": "sae_jax", "activation_dim": int(d),
                   "dict_size": int(m), record.dl_sparsity_field: setting, "seed": info.get("seed"),
                   "lm_name": prov.get("model_name"), "submodule_name": prov.get("hook_name"), "sae_jax": info}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if fmt == "saelens":
        st.save(out / "sae_weights.safetensors", tensors)
        if "firing_freq" in w:
            st.save(out / "sparsity.safetensors", {"sparsity": np.log10(w["firing_freq"] + 1e-10).astype(np.float32)})
        (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    else:
        st.save(out / "ae.safetensors", tensors)
        (out / "config.json").write_text(json.dumps({"trainer": trainer}, indent=2))
    return out
