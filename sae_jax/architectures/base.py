"""The record every architecture is, and the machinery the records share.

A record (`Architecture`) holds everything that differs between architectures: its name; its
sparsity setting's results.json key, short name and axis label; the traced per-cell coefficient
it reads (alpha, lambda or none); whether it takes k and a threshold; its inference codes, its
training codes and loss; its sparse-decoder path and that path's "auto" rule; how a threshold
is maintained during training and when the resampler recycles a latent; its export targets; its
figure titles. Records are frozen dataclasses, so static and hashable; a subclass may add fields
of its own (static options such as a list of widths), which its methods read from `self`.

The static part of one group of cells is an `Arch` (`sae_jax.architectures.Arch`: the record's
name, k, and per-grid overrides of the record's declared `options`); per-cell numbers (alpha,
lambda) stay traced, so the cells of one (arch, size, k) group train in one vmapped step.

Shared here: the pre-activations p = W_e (x - b_dec) + b_e, the top-k masks, the threshold
theta = exp(log_theta) and its inference codes p * [p > theta] (`ThresholdEncode`), AuxK's
loss, and the dense loss L = (1/d)||t - x^||^2 + S (+ L_aux) with x^ = D^ c + b_dec, into which
each record puts its codes c and sparsity term S.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae
from sae_jax.errors import UsageError

Array = jax.Array
Options = tuple[tuple[str, Any], ...]  # (key, value) pairs: hashable static options
LossOut = tuple[Array, tuple[sae.LossAux, Array]]  # (L, (aux, the batch statistic a threshold tracks))
SparseOut = tuple[Array, tuple[sae.LossAux, Array], Array]  # LossOut's, and the residual t - x^
SPARSE_MODES = ("auto", "on", "off")
SPARSE_AUTO_RATIO = 64  # "auto" with XLA's CPU kernels: TopK sparse where k <= m / 64


class CellArch(Protocol):
    """What a record reads of a group's static architecture (`sae_jax.architectures.Arch`)."""

    name: str
    k: int
    options: Options


class ArchOptions(NamedTuple):
    """Static training options of the architectures (from `TrainConfig`)."""

    bandwidth: float = 0.05  # JumpReLU's kernel width eps
    aux_k_coeff: float | None = None  # AuxK's coefficient (0: off; None: the record's default)
    aux_k: int = 0  # AuxK's k_aux (0: d / 2)
    sparse: str = "auto"  # records with a sparse path, without the dense AuxK: the sparse decoder
    #                       (sae_jax.sparse): "on", "off", or "auto" (`Architecture.uses_sparse`)
    compute_dtype: str = "float32"  # the sparse path's encoder GEMM operands and kernel rows
    aux_slots: int = 0  # AuxK over at most this many dead latents, gathered (`aux_k_loss_gathered`;
    #                     the grid picks it per step where it is exact); 0: over every latent


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture: its data and, as methods, what it computes. Subclasses override the
    methods their architecture changes; the defaults are the plain dense codes' behaviour."""

    name: str
    sparsity_key: str  # its sparsity setting in results.json: "l1", "k", "l0_coeff"
    sparsity_name: str  # ... in reports and titles: "alpha", "k", "lambda"
    sparsity_label: str  # ... on a figure's axis
    title: str  # what prefixes its figures' titles ("": none, the report's own)
    coeff: str = "none"  # the traced per-cell coefficient its loss reads: "l1" (alpha), "l0"
    #                      (lambda) or "none"
    uses_k: bool = False  # cells take k (active latents) and group by it; selects by top-k
    has_threshold: bool = False  # its params carry log_threshold_M (`sae.ThresholdSAEParams`)
    penalty_per_latent: bool = False  # its coefficient scales a sum over latents, divided by m
    #                                   under the report's convention (selection's size exponent)
    default_aux_k_coeff: float = 0.0  # AuxK's coefficient unless given (0: off)
    fused_step: bool = False  # `fused.group_loss_and_grad` computes its loss (relu_l1's)
    sparse_decoder: bool = False  # it has a sparse-decoder loss (`sparse_loss`)
    saelens_arch: str = ""  # SAELens's cfg.json architecture
    dl_class: str = ""  # dictionary_learning's class
    dl_sparsity_field: str = "k"  # dictionary_learning's trainer-config name of its setting
    options: Options = ()  # declared static options and their defaults (`option`)
    option_help: Options = ()  # (key, help) of each declared option: its flag --NAME-KEY's help

    # ------------------------------------------------------------------ static options
    def option(self, arch: CellArch, key: str) -> Any:
        """The group's value of a declared option: its override in `arch.options`, else the
        record's default."""
        defaults = dict(self.options)
        if key not in defaults:
            raise KeyError(f"{self.name} declares no option {key!r}")
        return dict(arch.options).get(key, defaults[key])

    def parse_option(self, key: str, text: str) -> Any:
        """An option's value from text (`--arch-option NAME.KEY=TEXT`): a comma list of numbers
        where the default is a tuple, else one number of the default's type."""
        defaults = dict(self.options)
        if key not in defaults:
            raise UsageError(f"`arch_options`: {self.name} has no option {key!r} (it has "
                             f"{', '.join(defaults) or 'none'})", field="arch_options")
        try:
            vals = tuple(float(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise UsageError(f"`arch_options`: {self.name}.{key} takes numbers, got {text!r}",
                             field="arch_options") from None
        default = defaults[key]
        if isinstance(default, tuple):
            return vals
        if len(vals) != 1:
            raise UsageError(f"`arch_options`: {self.name}.{key} takes one number, got {text!r}",
                             field="arch_options")
        return type(default)(vals[0])

    def check(self, arch: CellArch, dict_size: int) -> None:
        """Raises UsageError where the group's static options do not suit a dictionary of
        `dict_size` latents (nothing to check by default)."""

    # ------------------------------------------------------------------ codes and loss
    def encode(self, params: sae.SAEParams, x_BxD: Array, arch: CellArch) -> Array:
        """Inference codes (B, m)."""
        raise NotImplementedError(self.name)

    def train_codes(self, params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: CellArch,
                    convention: str, eps: float) -> tuple[Array, Array, Array, Array]:
        """(codes (B, m) as trained, pre-activations p, the sparsity term S, the batch statistic
        a threshold tracks (0 where none does))."""
        raise NotImplementedError(self.name)

    def aux_k_coeff(self, opts: ArchOptions) -> float:
        """AuxK's coefficient: the one given, else the record's default."""
        return self.default_aux_k_coeff if opts.aux_k_coeff is None else opts.aux_k_coeff

    def aux_forms(self, opts: ArchOptions, m: int, d: int) -> tuple[tuple[int, ArchOptions], ...]:
        """AuxK's exact forms for a group of m latents in d dimensions, as (n, options) pairs in
        order: the first whose n is at least the group's most dead latents in a cell is exact for
        the step. Without dead latents the term is 0, so no AuxK (and the sparse decoder where the
        record has one); up to S = min(m, k_aux) the gathered form (`aux_k_loss_gathered`, which
        then needs no top-k: every dead latent is among each sample's k_aux largest); beyond, the
        dense one. One form where AuxK is off or its form is set."""
        if not self.aux_k_coeff(opts) or opts.aux_slots:
            return ((m, opts),)
        slots = min(m, k_aux(opts, d))
        forms = ((0, opts._replace(aux_k_coeff=0.0)), (slots, opts._replace(aux_slots=slots)))
        return forms if slots >= m else forms + ((m, opts),)

    def sparse_auto(self, arch: CellArch, m: int) -> bool:
        """`sparse` "auto" on the CPU: whether the sparse path is the faster (only asked of
        records with a sparse path)."""
        return False

    def uses_sparse(self, arch: CellArch, m: int, opts: ArchOptions) -> bool:
        """Whether a cell of m latents trains through the sparse decoder: never without a sparse
        path or with the dense AuxK (whose dead-latent codes need every pre-activation; the
        gathered one, `aux_slots`, recomputes its own); "on", "off", or "auto": on the CPU the
        record's `sparse_auto`, never on other backends (on an H200 the sparse step through XLA's
        gathers ran 4-10x slower than the dense one)."""
        if not self.sparse_decoder or (self.aux_k_coeff(opts) and not opts.aux_slots) or opts.sparse == "off":
            return False
        if opts.sparse == "on":
            return True
        return jax.default_backend() == "cpu" and self.sparse_auto(arch, m)

    def sparse_loss(self, params: sae.SAEParams, x_BxD: Array, t_BxD: Array, arch: CellArch,
                    convention: str, compute_dtype: str) -> SparseOut:
        """The loss through the sparse decoder: the dense formulation's values, and the residual
        t - x^ (for AuxK; unused, it is never computed)."""
        raise NotImplementedError(self.name)

    def loss(self, params: sae.SAEParams, x_BxD: Array, coeff: Array, arch: CellArch,
             convention: str, target_BxD: Array | None, opts: ArchOptions,
             dead_M: Array | None) -> LossOut:
        """L = (1/d)||t - x^||^2 + S + coeff_aux * L_aux, through the sparse decoder where
        `uses_sparse`; L_aux only with dead latents given and a nonzero AuxK coefficient, over
        every latent's pre-activation or, with `opts.aux_slots`, the gathered dead latents'."""
        t = x_BxD if target_BxD is None else target_BxD
        if self.uses_sparse(arch, params.W_enc_MxD.shape[0], opts):
            total, (aux, stat), resid = self.sparse_loss(params, x_BxD, t, arch, convention, opts.compute_dtype)
        else:
            c, pre, sparsity, stat = self.train_codes(params, x_BxD, coeff, arch, convention, opts.bandwidth)
            x_hat = sae.decode(params, c)
            active = c > 0
            aux = loss_aux(t, x_hat, sae.l1_penalty(c, convention), active, jnp.any(active, axis=0))
            total, resid = aux.mse + sparsity, t - x_hat
            extra = self.codes_loss(params, c, residual_target(params, t), arch)
            if extra is not None:
                total = total + extra
        aux_coeff = self.aux_k_coeff(opts)
        if aux_coeff and dead_M is not None:
            ka = k_aux(opts, x_BxD.shape[-1])
            term = (aux_k_loss_gathered(params, x_BxD, resid, dead_M, ka, opts.aux_slots) if opts.aux_slots
                    else aux_k_loss(params, pre, resid, dead_M, ka))
            total = total + aux_coeff * term
        return total, (aux, stat)

    def codes_loss(self, params: sae.SAEParams, c_BxM: Array, resid_BxD: Array,
                   arch: CellArch) -> Array | None:
        """Terms of the dense loss beyond (1/d)||t - x^||^2 + S that read the trained codes c and
        r = t - b_dec (e.g. Matryoshka's nested prefixes); None (the default): none."""
        return None

    # ------------------------------------------------------------------ training state
    def track_threshold(self, old: sae.SAEParams, new: sae.SAEParams, stat: Array,
                        diverged: Array, decay: float, step: Array) -> sae.SAEParams:
        """The cell's parameters after a step, with a threshold that is not learned moved
        towards the batch statistic `stat` (none by default: `new` as it is)."""
        return new

    def recycle(self, params: sae.SAEParams, old: sae.SAEParams, mask_M: Array,
                live_M: Array) -> sae.SAEParams:
        """The resampler's recycled latents (mask_M) beyond their encoder and decoder rows,
        given the live latents live_M (nothing by default: `params` as it is)."""
        return params

    # ------------------------------------------------------------------ export
    def saelens_config(self, arch: CellArch) -> dict:
        """SAELens cfg.json entries beyond the shared ones (architecture, d_in, ...)."""
        return {}

    def dictionary_learning(self, w: dict[str, np.ndarray], arch: CellArch) -> dict[str, np.ndarray]:
        """The state dict of `dl_class` from the cell's weights (`export.read_cell`'s arrays)."""
        raise NotImplementedError(self.name)


# ---------------------------------------------------------------------- shared machinery
def folded_bias(params: sae.SAEParams) -> Array:
    """b_e - W_e b_dec: the encoder bias with the decoder bias folded in, so that
    W_e (x - b_dec) + b_e = W_e x + folded_bias and a batch x shared by a group's cells stays
    shared (one GEMM for the group)."""
    if params.b_dec_D is None:
        return params.b_enc_M
    return params.b_enc_M - params.W_enc_MxD @ params.b_dec_D


def pre_acts(params: sae.SAEParams, x_BxD: Array) -> Array:
    """p = W_e (x - b_dec) + b_e, computed as W_e x + (b_e - W_e b_dec) (`folded_bias`)."""
    return x_BxD @ params.W_enc_MxD.T + folded_bias(params)


def residual_target(params: sae.SAEParams, t_BxD: Array) -> Array:
    """t - b_dec: what the codes' decoding D^ c must reconstruct."""
    return sae.centred(params, t_BxD)


def threshold(params: sae.SAEParams) -> Array:
    """theta = exp(log_theta) (per latent)."""
    return jnp.exp(params.log_threshold_M)


class ThresholdEncode:
    """Mixin for the records whose learned or tracked threshold gates the codes at inference
    (JumpReLU's, BatchTopK's): c = p * [p > theta], theta = exp(log_theta) per latent."""

    def encode(self, params: sae.SAEParams, x_BxD: Array, arch: CellArch) -> Array:
        """Inference codes (B, m): c = p * [p > theta]."""
        pre = pre_acts(params, x_BxD)
        return jnp.where(pre > threshold(params), pre, 0.0)


def topk_mask(pre_BxM: Array, k: int) -> Array:
    """True on each row's k largest entries."""
    from sae_jax import sparse

    return pre_BxM >= sparse.kth_largest(pre_BxM, k)[..., None]


def batch_topk_mask(pre_BxM: Array, k: int) -> tuple[Array, Array]:
    """(True on the batch's k*B largest entries, the smallest kept entry)."""
    from sae_jax import sparse

    n = min(k * pre_BxM.shape[0], pre_BxM.size)
    kth = sparse.kth_largest(pre_BxM.reshape(1, -1), n)[0]
    return pre_BxM >= kth, kth


def sum_over_latents(a_BxM: Array, convention: str) -> Array:
    """mean_b sum_j a_bj, divided by m under the "report" convention."""
    per_sample = jnp.sum(a_BxM, axis=-1)
    return jnp.mean(per_sample / a_BxM.shape[-1] if convention == "report" else per_sample)


def loss_aux(t_BxD: Array, x_hat_BxD: Array, l1: Array, active: Array, fired_M: Array) -> sae.LossAux:
    """`sae.LossAux` from the reconstruction, the L1 term and the active codes (any layout whose
    last axis runs over one sample's codes)."""
    sq = jnp.square(t_BxD - x_hat_BxD)
    return sae.LossAux(jnp.mean(sq), l1, jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)),
                       fired_M, jnp.sum(sq, axis=-1))


def k_aux(opts: ArchOptions, d: int) -> int:
    """AuxK's k_aux: the one given, else d / 2."""
    return opts.aux_k or max(1, d // 2)


def aux_k_loss(params: sae.SAEParams, pre_BxM: Array, resid_BxD: Array, dead_M: Array,
               k_aux: int) -> Array:
    """||e - e^||^2 / ||e - mean e||^2 (batch means) with e^ decoded from the dead latents' k_aux
    largest ReLU pre-activations per sample; 0 when no latent is dead."""
    dead_pre = jnp.where(dead_M, jax.nn.relu(pre_BxM), 0.0)
    return _aux_ratio(resid_BxD, dead_pre, dead_M, k_aux, params.D_MxD, jnp.any(dead_M))


def aux_k_loss_gathered(params: sae.SAEParams, x_BxD: Array, resid_BxD: Array, dead_M: Array,
                        k_aux: int, slots: int) -> Array:
    """`aux_k_loss` over the first S = min(slots, m) dead latents (in index order) alone: their
    pre-activations W_e[J] x + (b_e - W_e b_dec)[J] and atoms recomputed for those S rows J, so it
    costs S/m of the dense form and needs no other latent's pre-activation (the sparse decoder's
    steps have none). Equal to `aux_k_loss` whenever at most S latents are dead: each sample's
    k_aux largest dead pre-activations are then among the S gathered ones."""
    slots = min(slots, dead_M.shape[0])
    rows = jnp.argsort(jnp.logical_not(dead_M).astype(jnp.int32), stable=True)[:slots]
    dead_S = dead_M[rows]
    w_SxD = params.W_enc_MxD[rows]
    b_S = params.b_enc_M[rows] - (0.0 if params.b_dec_D is None else w_SxD @ params.b_dec_D)
    dead_pre = jnp.where(dead_S, jax.nn.relu(x_BxD @ w_SxD.T + b_S), 0.0)
    return _aux_ratio(resid_BxD, dead_pre, dead_S, k_aux, params.D_MxD[rows], jnp.any(dead_M))


def _aux_ratio(resid_BxD: Array, dead_pre_BxN: Array, dead_N: Array, k_aux: int, d_NxD: Array,
               any_dead: Array) -> Array:
    """AuxK's ratio from the dead latents' ReLU pre-activations (0 on live ones) over N latents
    and their decoder rows: each sample's k_aux largest decoded (unit rows, no decoder bias)."""
    e = jax.lax.stop_gradient(resid_BxD)
    k_aux = min(k_aux, dead_pre_BxN.shape[-1])
    codes = dead_pre_BxN
    if k_aux < dead_pre_BxN.shape[-1]:
        codes = jnp.where(topk_mask(dead_pre_BxN, k_aux) & dead_N, dead_pre_BxN, 0.0)
    e_hat = codes @ sae.unit_rows(d_NxD)
    var = jnp.mean(jnp.sum(jnp.square(e - jnp.mean(e, axis=0)), axis=-1))
    loss = jnp.mean(jnp.sum(jnp.square(e - e_hat), axis=-1)) / jnp.maximum(var, 1e-12)
    return jnp.where(any_dead, loss, 0.0)


def decoder_bias(w: dict[str, np.ndarray]) -> np.ndarray:
    """An exported cell's decoder bias, zeros when it has none."""
    return w["b_dec"] if "b_dec" in w else np.zeros(w["W_enc"].shape[1], np.float32)


def folded_encoder_bias(w: dict[str, np.ndarray]) -> np.ndarray:
    """b_enc - W_enc b_dec, for export targets whose encoder does not subtract b_dec first (the
    same pre-activations)."""
    return (w["b_enc"] - w["W_enc"].astype(np.float64) @ decoder_bias(w)).astype(np.float32)
