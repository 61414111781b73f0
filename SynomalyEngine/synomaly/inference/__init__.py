"""Inference: an input checked and prepared, the diffusion stages, the map post-processed: ``detection.detect``."""
