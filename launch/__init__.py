"""Launchers: local multi-process runs now; SLURM submission from cluster profiles later."""
