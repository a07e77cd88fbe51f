"""Diffusion: the VP and EDM processes, samplers and guidance, the sampling pipeline, and writing samples."""
