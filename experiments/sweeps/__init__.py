"""Reproducibility sweeps: sweep files (base_seeds.py, vqa_seeds.py, lr_warmup_grid.py) and
the resumable runner, `python -m experiments.sweeps.run <sweep file> --workdir=DIR`."""
