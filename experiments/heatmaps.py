"""Figures 3, 4, 7, 8, 9 and 10: the alpha x ratio heatmaps (MMCS, dead latents, standardised
log losses, SSLL, MMCS with larger dictionaries) and the suggestion without ground truth.
The full preset run, the same as `sae-jax toy`, which also adds the denoising appendix.

    python experiments/heatmaps.py [--preset small|paper] [--out DIR] [any sae-jax toy flag]
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("heatmaps", __doc__, ["--no-appendix"]))
