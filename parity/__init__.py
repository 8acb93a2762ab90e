"""Numerical parity and diagnostics harness for MLX ports of video diffusion models."""
from parity.threads import load_mlx_blas as _load_mlx_blas

__version__ = "0.1.0"

_load_mlx_blas()  # MLX, once imported, binds its float32 GEMM to a system OpenBLAS (parity.threads)
