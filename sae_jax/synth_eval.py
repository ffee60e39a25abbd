"""SynthSAEBench's metrics of a trained SAE against the ground truth, with SAELens's definitions
(`sae_lens/synthetic/evals.py`, `eval_sae_on_synthetic_data`).

For an SAE with decoder rows W_dec (m, d), ground-truth feature vectors G (F, d), and evaluation
samples x_n with their ground-truth feature activations a_n (F,), codes c_n = encode(x_n) (the
cell's inference-time encoder) and reconstructions x^_n = decode(c_n):

- mcc: the one-to-one matching of latents to features that maximises sum |cos(W_dec_i, G_f)|
  (Hungarian, `scipy.optimize.linear_sum_assignment`, at any size), then the mean of the
  matched |cos| (min(m, F) pairs);
- uniqueness: #{distinct argmax_f |cos(W_dec_i, G_f)| over latents i} / m;
- precision, recall, f1, accuracy: each latent i is a detector of its best-matching feature
  f(i) = argmax_f |cos(W_dec_i, G_f)|: it fires when c_ni != 0, the feature is on when
  a_n,f(i) > 0; per latent TP / (TP + FP), TP / (TP + FN), their harmonic mean (each 0 where
  undefined) and (TP + TN) / N, then the mean over latents;
- l0 = mean_n #{i : c_ni != 0}; true_l0 = mean_n #{f : a_nf != 0};
- dead_latents = #{i : c_ni = 0 for every n} (on the evaluation samples);
- shrinkage = mean over samples with ||x_n|| > 1e-6 of ||x^_n|| / ||x_n||;
- explained_variance = 1 - sum_n ||x_n - x^_n||^2 / (sum_n ||x_n||^2 - N ||mean_n x_n||^2),
  the sums accumulated in float64 over the batches.

`evaluate` streams the samples in batches (one compiled program per batch shape), so 100,000
samples never sit in memory at once; `evaluate_many` scores several SAEs (a grid's cells) in
one such pass, each batch drawn once and encoded by every SAE.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

Array = jax.Array
METRICS = ("mcc", "uniqueness", "precision", "recall", "f1", "accuracy", "explained_variance", "l0",
           "true_l0", "shrinkage", "dead_latents")


def _abs_cos(a_MxD, b_FxD) -> np.ndarray:
    a = np.asarray(a_MxD, np.float64)
    b = np.asarray(b_FxD, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.abs(a @ b.T)


def mcc(decoder_MxD, features_FxD) -> float:
    """Mean |cos| of the Hungarian matching of latents to features (min(m, F) pairs)."""
    cos = _abs_cos(decoder_MxD, features_FxD)
    rows, cols = linear_sum_assignment(1.0 - cos)
    return float(cos[rows, cols].mean())


def best_matches(decoder_MxD, features_FxD) -> np.ndarray:
    """(m,) int: each latent's best-matching feature, argmax_f |cos(W_dec_i, G_f)|."""
    return np.argmax(_abs_cos(decoder_MxD, features_FxD), axis=1)


def uniqueness(decoder_MxD, features_FxD) -> float:
    """The number of distinct best-matching features over the number of latents."""
    m = np.shape(decoder_MxD)[0]
    return float(len(np.unique(best_matches(decoder_MxD, features_FxD))) / m) if m else 0.0


@jax.jit
def _batch_sums(c_BxM: Array, x_BxD: Array, x_hat_BxD: Array, acts_BxF: Array, match_M: Array) -> dict:
    """One batch's counts and sums (float32 within the batch; the host adds batches in float64)."""
    fires = c_BxM != 0
    # gathered along each sample's own row: the column gather acts_BxF[:, match_M] reads the
    # batch at a stride of F per entry
    on = jnp.take_along_axis(acts_BxF, jnp.broadcast_to(match_M, c_BxM.shape), axis=1) > 0
    norm_x = jnp.linalg.norm(x_BxD, axis=-1)
    ok = norm_x > 1e-6
    count = lambda a: jnp.sum(a, axis=0, dtype=jnp.float32)
    return {"tp": count(fires & on), "fp": count(fires & ~on), "fn": count(~fires & on),
            "tn": count(~fires & ~on), "fired": jnp.any(fires, axis=0),
            "l0": jnp.sum(fires, dtype=jnp.float32), "true_l0": jnp.sum(acts_BxF != 0, dtype=jnp.float32),
            "shrink": jnp.sum(jnp.where(ok, jnp.linalg.norm(x_hat_BxD, axis=-1) / jnp.where(ok, norm_x, 1.0), 0.0)),
            "shrink_n": jnp.sum(ok, dtype=jnp.float32), "sum_x": jnp.sum(x_BxD, axis=0),
            "sum_sq": jnp.sum(jnp.square(x_BxD)), "sum_res": jnp.sum(jnp.square(x_BxD - x_hat_BxD))}


Model = tuple[Callable[[Array], Array], Callable[[Array], Array], Any]  # (encode, decode, decoder_MxD)


def _add(total: dict[str, np.ndarray], sums: dict) -> None:
    for k, v in sums.items():
        v = np.asarray(v, bool if k == "fired" else np.float64)
        total[k] = v if k not in total else (total[k] | v if k == "fired" else total[k] + v)


def _finish(total: dict[str, np.ndarray], n: int, decoder_MxD, features_FxD) -> dict[str, float]:
    tp, fp, fn, tn = (total[k] for k in ("tp", "fp", "fn", "tn"))
    div = lambda a, b: np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)
    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    f1 = div(2 * precision * recall, precision + recall)
    variance = total["sum_sq"] - float(np.sum(np.square(total["sum_x"]))) / n
    return {"mcc": mcc(decoder_MxD, features_FxD), "uniqueness": uniqueness(decoder_MxD, features_FxD),
            "precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
            "accuracy": float(((tp + tn) / np.maximum(tp + fp + fn + tn, 1e-8)).mean()),
            "explained_variance": float(1.0 - total["sum_res"] / variance) if variance > 0 else 0.0,
            "l0": float(total["l0"] / n), "true_l0": float(total["true_l0"] / n),
            "shrinkage": float(total["shrink"] / total["shrink_n"]) if total["shrink_n"] else 0.0,
            "dead_latents": int((~total["fired"]).sum())}


def evaluate_many(models: Sequence[Model], features_FxD,
                  batches: Iterable[tuple[Array, Array]]) -> list[dict[str, float]]:
    """`evaluate` of several SAEs in one pass over the batches: each batch is drawn once and
    encoded by every model (a grid's cells on the same samples); one dict per model, in order."""
    matches = [jnp.asarray(best_matches(dec, features_FxD), jnp.int32) for _, _, dec in models]
    totals: list[dict[str, np.ndarray]] = [{} for _ in models]
    n = 0
    for x, acts in batches:
        x, acts = jnp.asarray(x, jnp.float32), jnp.asarray(acts)
        pending = []
        for (encode, decode, _), match in zip(models, matches):
            c = encode(x)
            pending.append(_batch_sums(c, x, decode(c), acts, match))  # dispatched, not yet waited on
        for total, sums in zip(totals, jax.device_get(pending)):
            _add(total, sums)
        n += x.shape[0]
    if not n:
        raise ValueError("evaluate needs at least one batch")
    return [_finish(t, n, dec, features_FxD) for t, (_, _, dec) in zip(totals, models)]


def evaluate(encode: Callable[[Array], Array], decode: Callable[[Array], Array], decoder_MxD,
             features_FxD, batches: Iterable[tuple[Array, Array]]) -> dict[str, float]:
    """Every metric of the module docstring, over the (x (B, d), feature activations (B, F))
    batches; encode/decode are the cell's inference-time functions."""
    return evaluate_many([(encode, decode, decoder_MxD)], features_FxD, batches)[0]
