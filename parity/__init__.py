"""Numerical parity and diagnostics harness for MLX ports of video diffusion models."""

__version__ = "0.1.0"
