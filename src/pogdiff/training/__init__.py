"""The training loop and what it owns: the row sampler, run folders and checkpoints, pretraining the small backbone."""
