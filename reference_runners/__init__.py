"""PyTorch references built on the real diffusers modules (code nobody here wrote)."""
