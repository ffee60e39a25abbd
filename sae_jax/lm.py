"""Byte-level language modelling: corpus, tokenizer, and the LM training loop.

Tokenizer: UTF-8 bytes, vocabulary 256 (no BPE, nothing downloaded).

Corpus: a text file, a directory of `.txt` files (recursive, sorted by path), or a `.jsonl`
file whose lines are objects with a `text` field; documents are joined with a blank line.
The default corpus is CPython's own documentation that ships with every Python installation:
the `pydoc_data.topics` module (the text `help('TOPIC')` prints, generated from the Python
language reference: ~79 topics, ~466 kB of English prose with code), joined in sorted topic
order. It needs no download and exists in any plain `python3.11` venv.

Training minimises the mean next-token cross-entropy (nats per byte)

    L(θ) = -1/(B·L) Σ_b Σ_t log p_θ(x_{b,t+1} | x_{b,≤t})

with AdamW (Loshchilov & Hutter 2019; decoupled weight decay on matrices only), gradient
clipping, and a learning rate that warms up linearly over the first 1% of steps and then
follows a cosine down to `min_lr_frac · lr`. Batches are random windows of the training split,
sampled on device from `fold_in(key(seed), step)`, so a run is a pure function of its config.
A trained model is a directory: `config.json`, `train_info.json`, and the parameters saved
through `sae_jax.checkpoint.Checkpointer` under `checkpoints/` (`save_model` / `load_model`).
The reference point for "the model learned something" is the unigram entropy of the corpus,
H = -Σ_v p(v) log p(v): the loss of the best model that ignores context.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import transformer
from sae_jax.errors import UsageError
from sae_jax.transformer import TransformerConfig

DEFAULT_CORPUS_NAME = "python-stdlib:pydoc_data.topics"
MODEL_FORMAT = "sae_jax.transformer/1"
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- corpus


def default_corpus() -> str:
    """The Python documentation topics bundled with CPython (`pydoc_data.topics`), sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise UsageError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
            docs.append(obj[text_field])
    return docs


def load_corpus(path: str | os.PathLike | None = None, text_field: str = "text") -> str:
    """Load a corpus as one string: a file, a directory of .txt files, or a .jsonl file; None = default."""
    if path is None:
        return default_corpus()
    p = Path(path)
    if not p.exists():
        raise UsageError(f"corpus not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise UsageError(f"corpus directory has no .txt files: {p}")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif p.suffix == ".jsonl":
        docs = _read_jsonl(p, text_field)
    else:
        docs = [p.read_text(encoding="utf-8", errors="replace")]
    text = "\n\n".join(docs)
    if not text.strip():
        raise UsageError(f"corpus is empty: {p}")
    return text


def encode(text: str) -> np.ndarray:
    """Byte tokenizer: text -> uint8 token ids (its UTF-8 bytes)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens_N: np.ndarray) -> str:
    """Inverse of `encode`; invalid UTF-8 sequences become U+FFFD."""
    return np.asarray(tokens_N, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def unigram_entropy(tokens_N: np.ndarray) -> float:
    """H = -Σ_v p(v) ln p(v) of the empirical token distribution, in nats per token."""
    counts_V = np.bincount(np.asarray(tokens_N).ravel())
    p_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(p_V * np.log(p_V)).sum())


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """Static training hyperparameters."""

    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.01
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


MODEL_PRESETS: dict[str, tuple[TransformerConfig, LMTrainConfig]] = {
    # The report's model; ~10 minutes on a 2-core CPU at these settings.
    "cpu": (TransformerConfig(), LMTrainConfig(steps=500, batch_size=16)),
    # The report's model with a GPU-sized budget (~12M tokens: ~26 passes over the 466 kB default
    # corpus; give a larger --corpus before raising --steps further).
    "paper": (TransformerConfig(), LMTrainConfig(steps=3000, batch_size=32)),
}


class LMState(NamedTuple):
    """Train state: parameters, optimizer state, step counter (int32 scalar)."""

    params: Any
    opt_state: Any
    step: jax.Array


def lr_schedule(tcfg: LMTrainConfig) -> optax.Schedule:
    """Linear warmup over max(1, ⌊warmup_frac·steps⌋) steps to `lr`, then cosine to `min_lr_frac·lr`."""
    warmup = max(1, int(tcfg.warmup_frac * tcfg.steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, tcfg.lr, warmup, max(tcfg.steps, warmup + 1), end_value=tcfg.lr * tcfg.min_lr_frac
    )


def make_optimizer(tcfg: LMTrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on ≥2-D leaves (not biases or LayerNorm)."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(
            lr_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay_mask
        ),
    )


def init_state(key: jax.Array, cfg: TransformerConfig, tcfg: LMTrainConfig) -> LMState:
    """Fresh parameters, optimizer state and step 0."""
    params = transformer.init(key, cfg)
    return LMState(params, make_optimizer(tcfg).init(params), jnp.zeros((), jnp.int32))


def sample_windows(key: jax.Array, tokens_N: jax.Array, batch: int, length: int) -> jax.Array:
    """`batch` uniformly random contiguous windows of `length` tokens: (batch, length) int32."""
    starts_B = jax.random.randint(key, (batch,), 0, tokens_N.shape[0] - length + 1)
    take = lambda s: jax.lax.dynamic_slice_in_dim(tokens_N, s, length)  # noqa: E731
    return jax.vmap(take)(starts_B).astype(jnp.int32)


def loss_fn(params: Any, tokens_BxL1: jax.Array, cfg: TransformerConfig) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of predicting tokens[:, 1:] from tokens[:, :-1]."""
    logits_BxLxV, _ = transformer.apply(params, tokens_BxL1[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL1[:, 1:]).mean()


def train_step(
    state: LMState, tokens_N: jax.Array, cfg: TransformerConfig, tcfg: LMTrainConfig
) -> tuple[LMState, jax.Array]:
    """One AdamW step on a batch sampled from `tokens_N` with key fold_in(key(seed), step)."""
    key = jax.random.fold_in(jax.random.key(tcfg.seed), state.step)
    batch_BxL1 = sample_windows(key, tokens_N, tcfg.batch_size, cfg.context_len + 1)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch_BxL1, cfg)
    updates, opt_state = make_optimizer(tcfg).update(grads, state.opt_state, state.params)
    return LMState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss


_jit_train_step = jax.jit(train_step, static_argnums=(2, 3), donate_argnums=(0,))


def _window_losses(params: Any, windows_BxL1: jax.Array, cfg: TransformerConfig) -> jax.Array:
    """Summed next-token cross-entropy of each window: (B,)."""
    logits_BxLxV, _ = transformer.apply(params, windows_BxL1[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, windows_BxL1[:, 1:]).sum(-1)


_jit_window_losses = jax.jit(_window_losses, static_argnums=(2,))


def evaluate(params: Any, tokens_N: np.ndarray, cfg: TransformerConfig, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over consecutive non-overlapping windows of `tokens_N`."""
    L, n_windows = cfg.context_len, (len(tokens_N) - 1) // cfg.context_len
    if n_windows == 0:
        raise ValueError(f"need more than {L} tokens to evaluate, got {len(tokens_N)}")
    total = 0.0
    for first in range(0, n_windows, batch_size):
        n = min(batch_size, n_windows - first)
        windows_BxL1 = np.zeros((batch_size, L + 1), np.int32)  # fixed shape: one compilation
        for b in range(n):
            s = (first + b) * L
            windows_BxL1[b] = tokens_N[s : s + L + 1]
        total += float(np.asarray(_jit_window_losses(params, jnp.asarray(windows_BxL1), cfg))[:n].sum())
    return total / (n_windows * L)


def split_tokens(tokens_N: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: the first (1 - val_fraction) of the corpus trains, the rest validates."""
    n_val = int(len(tokens_N) * val_fraction)
    return tokens_N[: len(tokens_N) - n_val], tokens_N[len(tokens_N) - n_val :]


def _open_checkpoints(directory, every: int, resume: bool):
    if directory is None or not (every or resume):
        return None
    from sae_jax.checkpoint import Checkpointer
    return Checkpointer(directory, max_to_keep=2)


def _resume(ckpt, state: LMState, run_config: dict[str, Any]) -> tuple[LMState, list[float]]:
    """The newest complete checkpoint's state and loss history; refuses different arguments."""
    from sae_jax.checkpoint import resume

    if ckpt is None:
        raise UsageError("--resume: no complete checkpoint (no checkpoint directory)")
    state, meta, _ = resume(ckpt, state, run_config)
    return state, list(meta.get("losses", []))


def train_lm(
    tokens_N: np.ndarray,
    cfg: TransformerConfig,
    tcfg: LMTrainConfig,
    progress: bool = True,
    log_every: int = 10,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train from scratch on byte tokens; return (params, info) with losses in nats/token and bits/token.

    With `checkpoint_dir`, the whole train state is saved every `checkpoint_every` steps; `resume`
    continues from the newest complete checkpoint (refused when `run_config` differs). Batches
    depend on the step only, so a resumed run ends with the same parameters.

    `info` holds the per-step training loss, the held-out loss, the corpus unigram entropy, and
    wall-clock throughput (tokens/s, excluding the first step, which includes compilation).
    """
    from tqdm.auto import tqdm

    train_N, val_N = split_tokens(np.asarray(tokens_N, np.uint8), tcfg.val_fraction)
    if len(train_N) <= cfg.context_len:
        raise UsageError(
            f"corpus has {len(train_N)} training bytes; need more than context_len={cfg.context_len}"
        )
    state = init_state(jax.random.key(tcfg.seed), cfg, tcfg)
    train_dev_N = jnp.asarray(train_N)
    tokens_per_step = tcfg.batch_size * cfg.context_len
    losses: list[float] = []
    ckpt = _open_checkpoints(checkpoint_dir, checkpoint_every, resume)
    try:  # closes the checkpointer on every path, early errors included
        if resume:
            state, losses = _resume(ckpt, state, run_config or {})
        start = int(state.step)
        pending: list[jax.Array] = []
        t_start = t_first = time.perf_counter()
        with tqdm(total=tcfg.steps, initial=start, desc="train-lm", unit="step", disable=not progress) as bar:
            for i in range(start, tcfg.steps):
                state, loss = _jit_train_step(state, train_dev_N, cfg, tcfg)
                pending.append(loss)
                if i == start:
                    loss.block_until_ready()
                    t_first = time.perf_counter()
                save = ckpt is not None and checkpoint_every and (i + 1) % checkpoint_every == 0
                if (i + 1) % log_every == 0 or i + 1 == tcfg.steps or save:
                    losses.extend(float(x) for x in jax.device_get(pending))
                    pending = []
                    rate = (i - start) * tokens_per_step / max(time.perf_counter() - t_first, 1e-9)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
                    bar.update((i + 1) - bar.n)
                if save:
                    ckpt.save(i + 1, state, {"run_config": run_config or {}, "losses": losses})
    finally:
        if ckpt is not None:
            ckpt.close()
    t_end = time.perf_counter()
    params = state.params
    h = unigram_entropy(tokens_N)
    tail = losses[-max(1, len(losses) // 20) :]
    val_loss = evaluate(params, val_N, cfg) if len(val_N) > cfg.context_len else None
    info: dict[str, Any] = {
        "unit": "nats/byte (divide by ln 2 for bits/byte)",
        "steps": tcfg.steps,
        "tokens_seen": tcfg.steps * tokens_per_step,
        "corpus_bytes": int(len(tokens_N)),
        "n_params": transformer.count_params(params),
        "train_seconds": t_end - t_start,
        "tokens_per_s": max(tcfg.steps - start - 1, 0) * tokens_per_step / max(t_end - t_first, 1e-9),
        "unigram_entropy": h,
        "unigram_entropy_bits": h / LN2,
        "final_train_loss": float(np.mean(tail)),
        "final_train_loss_bits": float(np.mean(tail)) / LN2,
        "val_loss": val_loss,
        "val_loss_bits": None if val_loss is None else val_loss / LN2,
        "loss_history": losses,
        "model_config": dataclasses.asdict(cfg),
        "train_config": dataclasses.asdict(tcfg),
    }
    return params, info


# ----------------------------------------------------------------------------- model files


def save_model(
    directory: str | os.PathLike, params: Any, cfg: TransformerConfig, info: dict | None = None, step: int = 0
) -> Path:
    """Write `config.json`, `train_info.json` (if given) and the parameters (Checkpointer, `checkpoints/`)."""
    from sae_jax.checkpoint import Checkpointer

    d = Path(directory).expanduser().absolute()
    d.mkdir(parents=True, exist_ok=True)
    config = {"format": MODEL_FORMAT, "config": dataclasses.asdict(cfg)}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    with Checkpointer(d / "checkpoints", max_to_keep=1) as ckpt:
        ckpt.save(step, params, config)
    if info is not None:
        (d / "train_info.json").write_text(json.dumps(info, indent=2))
    return d


def load_model(directory: str | os.PathLike) -> tuple[Any, TransformerConfig]:
    """Inverse of `save_model`: (params, cfg). A directory that is not a saved model raises UsageError."""
    from sae_jax.checkpoint import Checkpointer

    d = Path(directory).expanduser().absolute()
    if not (d / "config.json").is_file() or not (d / "checkpoints").is_dir():
        raise UsageError(f"not a trained model directory (needs config.json and checkpoints/): {d}")
    try:
        cfg = TransformerConfig(**json.loads((d / "config.json").read_text())["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"invalid model config in {d / 'config.json'}: {e}") from None
    abstract = jax.eval_shape(lambda key: transformer.init(key, cfg), jax.random.key(0))
    with Checkpointer(d / "checkpoints", max_to_keep=1) as ckpt:
        params, _, _ = ckpt.restore(abstract)
    return params, cfg
