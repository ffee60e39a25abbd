"""Figures 1, 5 and 6: MMCS, reconstruction loss and L1 loss against alpha at ratio 1.

    python experiments/l1_sweep.py [--preset small|paper] [--out DIR] [any sae-jax toy flag]
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("l1_sweep", __doc__, ["--ratios", "1", "--no-appendix"]))
