"""Evaluation: generate "An image of {name}." per identity and score it, split into All and Few."""
