"""`TrainConfig`: the static training options every cell of a grid shares (the report's recipe
by default). A new training knob is a field here (or of `resample.ResampleConfig`) made with
`knobs.knob` (its flag, help and choices come from there), checked in `validate`, used in `grid`
(the step) or `fused` (the hand-written gradients)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import optax

from sae_jax import archs, resample, sae
from sae_jax.errors import UsageError
from sae_jax.knobs import ARCHS, fixed, knob


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static training options shared by every cell (the report's recipe by default)."""

    batch_size: int = knob(256, "samples per step, shared by every cell", parse=int)
    lr: float = knob(1e-3, "Adam's learning rate", parse=float)
    b1: float = knob(0.9, "Adam's beta1", flag="--adam-b1", parse=float)
    b2: float = knob(0.999, "Adam's beta2", flag="--adam-b2", parse=float)
    eps: float = fixed(1e-8, "Adam's epsilon")
    l1_convention: str = knob("report", "L1 = ||c||_1 / m (report) or ||c||_1 (sum)", choices=sae.L1_CONVENTIONS)
    lr_warmup: int = knob(0, "linear learning-rate warm-up steps", parse=int)
    lr_decay_steps: int = knob(0, "cosine decay to 0 over this many steps (0: constant)", parse=int)
    tied_init: bool = knob(False, "start the encoder as the decoder, W_e = D (on in --recipe fast)",
                           boolean="both")
    # Divergence check: every gradient and updated parameter element (True), or only the loss and
    # the gradient's squared norm (False: ~12% faster steps on 2 CPU cores, different XLA fusion,
    # so float results differ in the last bits; the report recipe keeps True and its numbers).
    full_finite_check: bool = fixed(True, "the divergence check reads every element (recipes set it)")
    l1_warmup: int = knob(0, "alpha ramps linearly from 0 over this many steps", parse=int)
    dead_window: int = knob(10, "dead = did not fire in the last N steps", parse=int)
    denoise: bool = fixed(False, "add each cell's Gaussian input noise; the target stays clean (the "
                                 "denoising appendix sets it)")
    resample: resample.ResampleConfig = fixed(resample.ResampleConfig(), "off by default; flags of its own")
    # Matmul operands in this dtype, float32 accumulation; parameters, Adam, loss and metrics stay
    # float32. bfloat16 always takes the fused step.
    compute_dtype: str = knob("float32", "matmul operands (float32 accumulation; weights, Adam, loss stay "
                                         "float32)", choices=sae.COMPUTE_DTYPES)
    fused_step: bool = knob(False, "the group's gradients by hand in fast layouts (always on in bfloat16)",
                            boolean="switch")
    # Architectures other than the report's relu_l1 (sae_jax.archs):
    # AuxK loss coefficient: None, each architecture's default (archs.aux_k_coeff: Gao et al.'s
    # 1/32 for topk and batchtopk, whose dead latents get no other gradient; off for jumprelu),
    # off wherever resampling is on (it recycles dead latents itself; `arch_options`);
    # 0: off (topk and batchtopk may then take the sparse decoder)
    aux_k_coeff: float | None = knob(None, "AuxK dead-latent loss coefficient (default: Gao et al.'s 1/32 "
                                           "for topk and batchtopk without resampling, else off; 0: off)",
                                     group=ARCHS, parse=float)
    aux_k: int = knob(0, "AuxK's k_aux: dead latents reconstructing the residual (default d/2)",
                      group=ARCHS, parse=int)
    sparse_decoder: str = knob("auto", "topk and batchtopk groups through the sparse gather/scatter decoder: "
                                       "auto (on the CPU with the native kernels; without them topk where "
                                       "k <= m/64), on, off; with AuxK, in steps with at most k_aux dead "
                                       "latents", group=ARCHS, choices=archs.SPARSE_MODES)
    jumprelu_bandwidth: float = knob(0.05, "JumpReLU's straight-through kernel width eps (pre-activation "
                                           "units)", group=ARCHS, parse=float)
    init_threshold: float = knob(0.05, "JumpReLU's initial threshold (and BatchTopK's before step 0)",
                                 group=ARCHS, parse=float)
    threshold_decay: float = knob(0.99, "BatchTopK: the inference threshold's exponential average "
                                        "(after 1/(1-decay) steps of a plain mean)", group=ARCHS, parse=float)
    decoder_bias: str = knob("none", "a trained decoder bias b_dec (x - b_dec into the encoder, + b_dec "
                                     "after the decoder) and its initial value: zero, the data mean or "
                                     "geometric median; none: no bias (toy's default, the report's SAE; "
                                     "grid: mean)", choices=sae.DECODER_BIAS_INITS)

    def validate(self) -> "TrainConfig":
        checks = [(n, "must be finite", math.isfinite) for n in ("lr", "b1", "b2")] + [
            ("batch_size", "must be >= 1", lambda v: v >= 1), ("lr", "must be finite and > 0", lambda v: v > 0),
            ("b1", "must be in [0, 1)", lambda v: 0 <= v < 1), ("b2", "must be in [0, 1)", lambda v: 0 <= v < 1),
            ("l1_convention", f"must be one of {sae.L1_CONVENTIONS}", lambda v: v in sae.L1_CONVENTIONS),
            ("dead_window", "must be >= 1", lambda v: v >= 1),
            ("compute_dtype", f"must be one of {', '.join(sae.COMPUTE_DTYPES)}",
             lambda v: v in sae.COMPUTE_DTYPES),
            ("aux_k_coeff", "must be finite and >= 0",
             lambda v: v is None or (math.isfinite(v) and v >= 0)),
            ("aux_k", "must be >= 0", lambda v: v >= 0),
            ("jumprelu_bandwidth", "must be finite and > 0", lambda v: math.isfinite(v) and v > 0),
            ("init_threshold", "must be finite and > 0", lambda v: math.isfinite(v) and v > 0),
            ("threshold_decay", "must be in [0, 1)", lambda v: 0 <= v < 1),
            ("sparse_decoder", f"must be one of {', '.join(archs.SPARSE_MODES)}",
             lambda v: v in archs.SPARSE_MODES),
            ("decoder_bias", f"must be one of {', '.join(sae.DECODER_BIAS_INITS)}",
             lambda v: v in sae.DECODER_BIAS_INITS)] + [
            (n, "must be >= 0", lambda v: v >= 0) for n in ("lr_warmup", "lr_decay_steps", "l1_warmup")]
        for name, must, ok in checks:
            if not ok(getattr(self, name)):
                raise UsageError(f"`{name}` {must}, got {getattr(self, name)!r}", field=name)
        self.resample.validate()
        return self

    @property
    def uses_fused_step(self) -> bool:
        return self.fused_step or self.compute_dtype != "float32"

    def to_dict(self) -> dict:
        """Flat, with the resampling fields under their `resample.FIELDS` names (results.json and
        checkpoints). The architecture options and the decoder bias appear only where they differ
        from their defaults, so runs checkpointed before they existed still resume."""
        d = dataclasses.asdict(self)
        d.update({k: d["resample"][f] for k, f in resample.FIELDS.items()})
        del d["resample"]
        for name in _ARCH_OPTIONS:
            if d[name] == getattr(TrainConfig, name):
                del d[name]
        return d

    @property
    def arch_options(self) -> "archs.ArchOptions":
        """The architectures' options. AuxK's coefficient is left to each architecture's default
        (None) only where resampling is off: resampling recycles dead latents itself, and AuxK on
        top of it was mixed (README: the fast recipe on the report's world lost 0.04 MMCS in
        TopK's and BatchTopK's best cells; a d 64 world with rarer features gained 0.06), while
        without resampling it gained on every world tried."""
        aux = 0.0 if self.aux_k_coeff is None and self.resample.every else self.aux_k_coeff
        return archs.ArchOptions(self.jumprelu_bandwidth, aux, self.aux_k, self.sparse_decoder,
                                 self.compute_dtype)

    def initial_decoder_bias(self, d: int, x_init: Any = None) -> np.ndarray | None:
        """b_dec's initial value (d,) under `decoder_bias` from the data sample x_init (N, d);
        None without a decoder bias."""
        if self.decoder_bias == "none":
            return None
        if self.decoder_bias == "zero":
            return np.zeros((d,), np.float32)
        if x_init is None or np.ndim(x_init) != 2 or np.shape(x_init)[-1] != d:
            raise UsageError(f"`decoder_bias` {self.decoder_bias!r} needs a data sample x_init of shape "
                             f"(N, {d}) to start from", field="decoder_bias")
        return np.asarray(sae.decoder_bias_init(x_init, self.decoder_bias), np.float32)

    def adam(self) -> optax.GradientTransformation:
        return optax.scale_by_adam(self.b1, self.b2, self.eps)


_ARCH_OPTIONS = ("aux_k_coeff", "aux_k", "sparse_decoder", "jumprelu_bandwidth", "init_threshold",
                 "threshold_decay", "decoder_bias")


# ------------------------------------------------------------------- the decoder bias's data

DECODER_BIAS_SAMPLES = 4096  # the data sample a decoder bias starts from (its mean or median)


def decoder_bias_sample(cfg: TrainConfig, seed: int, d: int, sample: Callable[[int, int], Any] | None,
                        batches: Callable[[int, int], Any] | None) -> np.ndarray | None:
    """The (N, d) sample b_dec's initial value is computed from: `sample(seed, N)`, the world's
    inputs (toy or SynthSAEBench) drawn from a key no training step uses,
    or the stream's first batches `batches(0, T)`; None where the decoder bias starts at zero."""
    if cfg.decoder_bias in ("none", "zero"):
        return None
    if sample is not None:
        return np.asarray(sample(seed, DECODER_BIAS_SAMPLES)).reshape(-1, d)
    n = -(-DECODER_BIAS_SAMPLES // cfg.batch_size)
    return np.asarray(batches(0, n), np.float32).reshape(-1, d)
