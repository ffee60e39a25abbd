"""`sae-jax export`: one trained cell of a run in SAELens or dictionary_learning format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    from sae_jax.export import FORMATS

    p = subparsers.add_parser(
        "export",
        help="write one trained cell in SAELens or dictionary_learning format",
        description="Export cell I of a run (from RUN_DIR/weights.safetensors) so that other SAE tools can "
        "load it. saelens: cfg.json + sae_weights.safetensors + sparsity.safetensors (SAE.load_from_disk); "
        "dictionary-learning: ae.safetensors (the state dict of AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE or "
        "JumpReluAutoEncoder) + config.json. Each architecture goes to the target's form of it: relu_l1 -> "
        "standard, topk -> topk, batchtopk and jumprelu -> jumprelu (SAELens).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `sae-jax toy` or `sae-jax grid`")
    p.add_argument("--cell", type=int, required=True, help="cell index (results.json cells[i].index)")
    p.add_argument("--format", choices=FORMATS, required=True, help="the target library's layout")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from sae_jax import export

    out = export.export(args.run_dir, args.cell, args.format, args.out)
    print(f"cell {args.cell} of {args.run_dir} written to {out} ({args.format})")
    return 0
