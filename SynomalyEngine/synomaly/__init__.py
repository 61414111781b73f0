"""Synomaly: unsupervised anomaly detection in medical volumes.

Synomaly noise + multi-stage diffusion (Bi et al., Medical Image Analysis 2025, arXiv 2411.04004),
for whole 3D volumes. Import is light: torch is imported only by the modules that need it.
"""

__version__ = "0.1.0"
