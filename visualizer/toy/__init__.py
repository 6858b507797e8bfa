"""The 2D playground: point patterns, a small MLP denoiser run by the image models' samplers and loop, its pictures."""
