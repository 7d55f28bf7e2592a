"""Native PyTorch Qwen-Image model code: transformer, VAE, text encoding."""
