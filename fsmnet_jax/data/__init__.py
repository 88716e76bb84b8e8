"""Data: k-space simulation, sampling masks, datasets and input pipelines."""
