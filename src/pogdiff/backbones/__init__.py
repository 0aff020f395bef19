"""What denoises: the small backbone and diffusers checkpoints, their loading, the shipped weights and the sampler."""
