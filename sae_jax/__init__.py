"""sae_jax: sparse autoencoders in JAX, trained as whole hyperparameter grids."""

__version__ = "0.1.0"
