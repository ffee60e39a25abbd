"""SAELens's synthetic-data trainer raced on sae_jax's toy world (used by recovery_race.py).

World: the report's (d 256, h 512, k 5, decay 0.99), built by ``sae_jax.toy.make_world`` from
the key that ``sae-jax toy --seed SEED`` uses, so both libraries see the same features g_i.
Each training batch is one ``sae_jax.toy.sample`` call (a fresh copula z per batch, as in
sae_jax's own toy training): the coefficients c_BxH go to SAELens as the feature activations
of a ``FeatureDictionary`` whose vectors are g, which returns x = c @ G.

Trainer: ``sae_lens.synthetic.train_toy_sae`` (the loop under ``SyntheticSAERunner``:
``SyntheticActivationIterator`` + ``SAETrainer``) on a ``StandardTrainingSAE`` (ReLU,
d_sae = 512) with SAELens's defaults (Kaiming decoder at norm 0.1, W_enc = W_dec^T, b_dec
subtracted from the input, grad-norm clip 1.0, Adam betas 0.9/0.999, constant lr), but batch
128 and lr 3e-3 (the fast recipe's), not its 1024 and 3e-4. The runner itself only takes a
``SyntheticModel`` (SAELens's own firing model, not the report's), hence ``train_toy_sae``.

Coefficient mapping. The report (sae_jax, "report" convention), unit-norm atoms D^_j:
    L_report  = (1/d) ||x - x^||^2 + (alpha/m) sum_j c_j
SAELens StandardTrainingSAE, free-norm W_dec rows:
    L_saelens = ||x - x^||^2 + lambda sum_j c_j ||W_dec_j||
With c'_j = c_j ||W_dec_j|| (the activation of the unit atom) the two are the same function and
d * L_report = L_saelens when lambda = alpha * d / m (= alpha / 2 here: 0.1, 0.2, 0.3 -> 0.05,
0.1, 0.15). Adam is invariant to the factor d, up to eps and SAELens's grad clipping.

MMCS = (1/h) sum_i max_j cos(g_i, W_dec_j), checked before step j of the loop when j is a
multiple of check_every (that is, after j completed steps) and after the last step.
Seconds run from the start of each cell: SAE construction, checks and drawing the data with
sae_jax's sampler (compiled once before the first cell; ``data_seconds`` is its share) included.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import numpy as np
import torch
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.synthetic import FeatureDictionary, train_toy_sae
from sae_lens.training import sae_trainer

from sae_jax import toy

THRESHOLDS = (0.95, 0.99)
CHUNK = 128  # batches drawn per sampler call
WORLD_SALT = 0x3017D  # sae_jax.run: world key = fold_in(PRNGKey(seed), 0x3017D)


def mmcs(decoder_MxD: torch.Tensor, truth_HxD: torch.Tensor) -> float:
    """Mean over ground-truth features of the max cosine with the learned decoder rows."""
    dec = torch.nn.functional.normalize(decoder_MxD.detach(), dim=1)
    return float((torch.nn.functional.normalize(truth_HxD, dim=1) @ dec.T).max(dim=1).values.mean())


class ToyCoefficients:
    """Feature activations for SAELens from sae_jax's sampler; records MMCS every K steps."""

    def __init__(self, sample: Callable[[jax.Array], jax.Array], key: jax.Array, chunk: int,
                 sae: StandardTrainingSAE, truth: torch.Tensor, check_every: int, t0: float) -> None:
        self.sample = sample  # keys_C -> coefficients_CxBxH, compiled before the clock starts
        self.key, self.chunk, self.buf, self.pos = key, chunk, np.empty((0,)), 0
        self.sae, self.truth, self.check_every, self.t0 = sae, truth, check_every, t0
        self.calls, self.data_seconds = 0, 0.0
        self.hits: dict[float, tuple[int, float]] = {}

    def check(self, step: int) -> float:
        m = mmcs(self.sae.W_dec, self.truth)
        for th in THRESHOLDS:
            if m >= th and th not in self.hits:
                self.hits[th] = (step, time.perf_counter() - self.t0)
        return m

    def __call__(self, batch_size: int) -> torch.Tensor:
        if self.calls and self.calls % self.check_every == 0:
            self.check(self.calls)  # `calls` steps have completed
        self.calls += 1
        t = time.perf_counter()
        if self.pos == len(self.buf):
            self.key, sub = jax.random.split(self.key)
            self.buf, self.pos = np.array(self.sample(jax.random.split(sub, self.chunk))), 0
        out = torch.from_numpy(self.buf[self.pos])
        self.pos += 1
        self.data_seconds += time.perf_counter() - t
        return out


def race_one(alpha: float, truth: torch.Tensor, sample: Callable[[jax.Array], jax.Array],
             steps: int, check_every: int, batch_size: int, seed: int, lr: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    h, d = truth.shape
    feature_dict = FeatureDictionary(h, d, initializer=None, seed=seed)
    feature_dict.feature_vectors.data = truth.clone()
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=h, l1_coefficient=alpha * d / h))
    data = ToyCoefficients(sample, jax.random.fold_in(jax.random.PRNGKey(seed), 0xDA7A), CHUNK,
                           sae, truth, check_every, t0)
    train_toy_sae(sae, feature_dict, data, training_samples=steps * batch_size,  # type: ignore[arg-type]
                  batch_size=batch_size, lr=lr)
    final = data.check(steps)
    cell: dict[str, Any] = {"l1": alpha, "saelens_l1_coefficient": alpha * d / h, "mmcs": final}
    for th in THRESHOLDS:
        step_s = data.hits.get(th)
        cell[f"steps_to_{th}"] = None if step_s is None else step_s[0]
        cell[f"seconds_to_{th}"] = None if step_s is None else round(step_s[1], 2)
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    cell["data_seconds"] = round(data.data_seconds, 2)
    return cell


def race(l1: list[float], steps: int, check_every: int, batch_size: int = 128, seed: int = 0,
         lr: float = 3e-3) -> list[dict[str, Any]]:
    """One SAELens run per alpha (report convention) on the report's world; see the docstring."""
    torch.set_num_threads(2)
    if not getattr(sae_trainer.tqdm, "_quiet", False):  # SAETrainer's progress bar: off
        sae_trainer.tqdm = functools.partial(sae_trainer.tqdm, disable=True)
        sae_trainer.tqdm._quiet = True  # type: ignore[attr-defined]
    world = toy.make_world(jax.random.fold_in(jax.random.PRNGKey(seed), WORLD_SALT), toy.ToyConfig())
    truth = torch.from_numpy(np.array(world.features_HxD, dtype=np.float32))
    sample = jax.jit(jax.vmap(lambda k: toy.sample(k, world, batch_size)[1]))
    sample(jax.random.split(jax.random.PRNGKey(0), CHUNK)).block_until_ready()  # compile
    return [race_one(float(a), truth, sample, steps, check_every, batch_size, seed, lr) for a in l1]


if __name__ == "__main__":
    import sys
    for c in race([0.2], int(sys.argv[1]) if len(sys.argv) > 1 else 2000, 250):
        print(c)
