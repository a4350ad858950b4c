"""Site generator: latent diffusion training and sampling (MONAI networks)."""
