"""`sae-jax train-lm` and `sae-jax harvest`: the language-model half of the command line.

`register(subparsers)` adds both subcommands to the main `sae-jax` parser; each handler takes
the parsed namespace, raises `UsageError` for bad input, and returns an exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from sae_jax.errors import UsageError

DEFAULT_HARVEST_TOKENS = 262_144


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-lm` and `harvest` subcommands."""
    from sae_jax.lm import MODEL_PRESETS

    p = subparsers.add_parser(
        "train-lm",
        help="train a byte-level GPT-2-style transformer on a corpus",
        description="Train a byte-level GPT-2-style transformer (AdamW, cosine schedule, 1% warmup). "
        "Preset values can be overridden flag by flag.",
    )
    _add_corpus_args(p, "the Python documentation bundled with CPython, pydoc_data.topics")
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="cpu",
                   help="cpu: 5-10 min on 2 CPU cores; paper: a GPU budget")
    p.add_argument("--steps", type=int, help="optimizer steps (cpu preset: 500, paper: 3000)")
    p.add_argument("--batch-size", type=int, help="sequences per step (cpu preset: 16, paper: 32)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay")
    p.add_argument("--seed", type=int, help="initialisation and batch-sampling seed")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--d-model", type=int, help="residual width")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--d-mlp", type=int, help="MLP width (the harvested dimension)")
    p.add_argument("--context-len", type=int, help="tokens per sequence")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="save the train state every N steps under OUT/train_checkpoints (0: off)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.set_defaults(func=run_train_lm)

    h = subparsers.add_parser(
        "harvest",
        help="store a trained model's MLP activations on disk",
        description="Run a trained model over its corpus and write one layer's post-GELU MLP activations "
        "to a sharded float16 store (manifest.json + shard_*.npy).",
    )
    h.add_argument("--model", required=True,
                   help="a directory written by train-lm, or `minilm` (the pretrained all-MiniLM-L6-v2)")
    h.add_argument("--layer", type=int, default=1, help="0-based block index (default: 1)")
    h.add_argument("--out", required=True, help="store directory to write")
    h.add_argument("--max-tokens", type=int, default=DEFAULT_HARVEST_TOKENS,
                   help=f"rows to store, one per token (default: {DEFAULT_HARVEST_TOKENS})")
    _add_corpus_args(h, "the model's training corpus")
    h.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (64; minilm: 32)")
    h.add_argument("--context-len", type=int, default=128,
                   help="minilm: tokens per sequence, [CLS] and [SEP] included (default 128)")
    h.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: 64 MiB shards)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    h.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    h.set_defaults(func=run_harvest)


def _add_corpus_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--corpus", default=None,
                        help=f"a text file, a directory of .txt files, or a .jsonl file (default: {default})")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl corpora (default: text)")


def _writable_dir(path: str) -> Path:
    """Create `path` if needed and check that a file can be written in it (the grid runs' check)."""
    from sae_jax.run import check_writable

    return check_writable(path)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_train_lm(args: argparse.Namespace) -> int:
    """Handler of `train-lm`: train, save the model and `train_info.json`, print the loss summary."""
    from sae_jax import lm

    _positive(args, "steps", "batch_size", "lr", "layers", "d_model", "heads", "d_mlp", "context_len")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be non-negative, got {args.weight_decay}")
    cfg, tcfg = lm.MODEL_PRESETS[args.preset]
    cfg_over = {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.heads,
                "d_mlp": args.d_mlp, "context_len": args.context_len}
    tcfg_over = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                 "weight_decay": args.weight_decay, "seed": args.seed}
    try:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in cfg_over.items() if v is not None})
        tcfg = dataclasses.replace(tcfg, **{k: v for k, v in tcfg_over.items() if v is not None})
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    text = lm.load_corpus(args.corpus, args.text_field)
    out = _writable_dir(args.out)
    tokens = lm.encode(text)
    run_config = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
                  "corpus": str(Path(args.corpus).expanduser().absolute()) if args.corpus else None,
                  "corpus_bytes": int(len(tokens))}
    params, info = lm.train_lm(tokens, cfg, tcfg, progress=not args.no_progress,
                               checkpoint_dir=Path(out) / "train_checkpoints",
                               checkpoint_every=args.checkpoint_every, resume=args.resume,
                               run_config=run_config)
    info["corpus"] = str(Path(args.corpus).expanduser().absolute()) if args.corpus else None
    info["corpus_name"] = info["corpus"] or lm.DEFAULT_CORPUS_NAME
    info["text_field"] = args.text_field
    lm.save_model(out, params, cfg, info, step=tcfg.steps)
    held_out = "" if info["val_loss"] is None else (
        f"; held-out loss {info['val_loss']:.3f} nats/byte ({info['val_loss_bits']:.3f} bits)")
    print(
        f"trained {info['n_params']:,} parameters for {tcfg.steps} steps in {info['train_seconds']:.0f} s "
        f"({info['tokens_per_s']:,.0f} tokens/s) on {info['corpus_name']} ({info['corpus_bytes']:,} bytes)\n"
        f"unigram entropy {info['unigram_entropy']:.3f} nats/byte ({info['unigram_entropy_bits']:.3f} bits); "
        f"final train loss {info['final_train_loss']:.3f} nats/byte "
        f"({info['final_train_loss_bits']:.3f} bits)"
        f"{held_out}\nmodel written to {out}"
    )
    return 0


def run_harvest(args: argparse.Namespace) -> int:
    """Handler of `harvest`: write the chosen layer's MLP activations to a store and print throughput."""
    from sae_jax import harvest, lm

    _positive(args, "max_tokens", "batch_size", "shard_rows", "context_len")
    if args.model == "minilm":
        return run_harvest_minilm(args)
    args.batch_size = args.batch_size or 64
    params, cfg = lm.load_model(args.model)
    if not 0 <= args.layer < cfg.n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    info_path = Path(args.model).expanduser().absolute() / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    corpus = args.corpus if args.corpus is not None else info.get("corpus")
    text_field = args.text_field if args.corpus is not None else info.get("text_field", args.text_field)
    text = lm.load_corpus(corpus, text_field)
    out = _store_out(args)
    source = {"model": str(Path(args.model).expanduser().absolute()),
              "corpus": corpus or lm.DEFAULT_CORPUS_NAME}
    store, stats = harvest.byte_lm(
        params, cfg, lm.encode(text), args.layer, out, max_tokens=args.max_tokens, batch_size=args.batch_size,
        shard_rows=args.shard_rows, source=source, overwrite=args.overwrite, progress=not args.no_progress,
    )
    _harvest_summary(store, stats, args.layer, out)
    return 0


def _store_out(args: argparse.Namespace) -> Path:
    out = Path(args.out).expanduser().absolute()
    if (out / "manifest.json").exists() and not args.overwrite:
        raise UsageError(f"activation store already exists at {out} (pass --overwrite to replace it)")
    _writable_dir(str(out))
    return out


def _harvest_summary(store, stats: dict, layer: int, out: Path) -> None:
    print(
        f"harvested {store.n:,} rows x {store.d} (layer {layer}, {store.dtype}, "
        f"{len(store.shard_files)} shards) in {stats['seconds']:.1f} s: "
        f"{stats['tokens_per_s']:,.0f} tokens/s\n"
        f"store written to {os.fspath(out)}"
    )


def run_harvest_minilm(args: argparse.Namespace) -> int:
    """`harvest --model minilm`: the pretrained MiniLM's block-N MLP activations, padding excluded."""
    from sae_jax import harvest, lm
    from sae_jax.models import minilm

    model = minilm.load()
    if not 0 <= args.layer < model[1].n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: MiniLM has layers 0..{model[1].n_layers - 1}")
    if not 3 <= args.context_len <= model[1].max_len:
        raise UsageError(f"--context-len must be in 3..{model[1].max_len}, got {args.context_len}")
    text = lm.load_corpus(args.corpus, args.text_field)
    out = _store_out(args)
    source = {"corpus": str(Path(args.corpus).expanduser().absolute()) if args.corpus else lm.DEFAULT_CORPUS_NAME}
    try:
        store, stats = harvest.minilm(
            text, args.layer, out, max_tokens=args.max_tokens, context_len=args.context_len,
            batch_size=args.batch_size or 32, shard_rows=args.shard_rows, source=source,
            overwrite=args.overwrite, progress=not args.no_progress, model=model)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    _harvest_summary(store, stats, args.layer, out)
    return 0
