"""Networks: the U-Net, and latent diffusion's autoencoder with its latent cache and decoder."""
