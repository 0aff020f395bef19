"""Encoding once per dataset: the frozen encoders, latents and caption states, Eq. 8's neighbours, Eq. 10's text density, and the sharded caches they live in."""
