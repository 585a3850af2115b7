"""Synthetic reasoning-data factory on masked diffusion language models."""

__version__ = "0.1.0"
