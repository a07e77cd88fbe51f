"""Diffusion: the VP and EDM processes and their loss, samplers and guidance, the sampling pipeline, and writing samples."""
