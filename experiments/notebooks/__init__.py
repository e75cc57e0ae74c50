"""Colab notebooks, kept as jupytext pairs (.ipynb without outputs + .py percent twin)."""
