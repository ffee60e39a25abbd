"""Appendix: denoising autoencoders. A noise-std x alpha heatmap of MMCS at dictionary size h,
without correlation or decay (the preset's noise levels; the main grid is shrunk to ratio 1).

    python experiments/denoising.py [--preset small|paper] [--out DIR]
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("denoising", __doc__, ["--ratios", "1", "--appendix"]))
