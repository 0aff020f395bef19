"""Datasets: the image-caption folder format and the embedded synthetic people."""
