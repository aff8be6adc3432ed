"""Slurm side of maescale: the sweep launcher (python -m slurm.sweep); the batch scripts beside it."""
