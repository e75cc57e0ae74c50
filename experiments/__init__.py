"""Notebooks (notebooks/) and reproducibility sweeps (sweeps/) around m6_jax."""
