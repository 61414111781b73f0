"""Synomaly: unsupervised anomaly detection in medical volumes.

Synomaly noise + multi-stage diffusion (Bi et al., Medical Image Analysis 2025, arXiv 2411.04004),
for whole 3D volumes. The package is built in wings, each importing only those below it:

    method/      the published method: noise, diffusion schedule, network, presets
    files/       geometry, volume and model files, a detection's outputs, overview pictures
    inference/   preprocessing, checks of the input, the stages, post-processing: ``detect``
    training/    settings, cases, slices, the loop with checkpoints, calibration, several processes
    evaluation/  metrics, labelled cases, the evaluation beside the baseline, phantoms
    commands/    the ``synomaly`` command (one module per command), cohorts, the demo, Slicer's worker

The names below are the few a user imports; each is loaded on first use, so ``import synomaly`` stays light
(torch is imported only by the modules that need it, never by this one: Slicer imports it in its own process).
"""

__version__ = "0.1.0"

_FACE = {
    "detect": "synomaly.inference.detection",
    "DetectionSettings": "synomaly.inference.detection",
    "train": "synomaly.training.loop",
    "TrainingSettings": "synomaly.training.settings",
    "load_model": "synomaly.files.model_file",
    "read_volume": "synomaly.files.volume_io",
    "write_volume": "synomaly.files.volume_io",
}
__all__ = ["__version__", *_FACE]


def __getattr__(name: str):
    if name in _FACE:
        import importlib

        return getattr(importlib.import_module(_FACE[name]), name)
    raise AttributeError(f"module 'synomaly' has no attribute {name!r}")
