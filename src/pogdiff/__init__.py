"""pogdiff: fine-tune text-to-image diffusion models on imbalanced data with PoGDiff.

PoGDiff (Wang et al., 2025) replaces the regression target of diffusion training by a
Product of Gaussians of the usual target and the model's own prediction under a
neighbouring caption, weighted by image similarity and inverse text density.
"""

__version__ = "0.1.0"
