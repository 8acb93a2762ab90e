"""Our MLX implementations of video-diffusion components (RoPE, time embedding, VAE encoder, DiT block, scheduler)."""
