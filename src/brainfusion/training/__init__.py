"""Training: the diffusion training loop, the autoencoder's, and their run log."""
