"""Figure 2: MMCS against dictionary size / features (every alpha of the preset).

    python experiments/dict_size_sweep.py [--preset small|paper] [--out DIR] [any sae-jax toy flag]
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("dict_size_sweep", __doc__, ["--no-appendix"]))
