"""Qt-free part of the Synomaly Detection module: parameters, MRML bridge, worker jobs, models, logic.

Nothing here imports torch: detection and training run in a worker process; the light parts of the
engine (model list, settings, volume files) are imported when needed.
"""
from .Dependencies import MissingDependencies, ensure_dependencies, missing_dependencies
from .Engine import Engine, ensure_engine_importable
from .JobRunner import WorkerError, WorkerJob
from .Logic import SynomalyLogic, format_report
from .LossCurve import LossCurve
from .Messages import panel_wording
from .Models import ModelEntry, available_models, default_user_models_dir
from .MrmlBridge import OutputNodes
from .Parameters import MODULE_NAME, Parameters, get_parameter_node

__all__ = [
    "Engine", "LossCurve", "MODULE_NAME", "MissingDependencies", "ModelEntry", "OutputNodes",
    "Parameters", "SynomalyLogic", "available_models", "default_user_models_dir", "ensure_dependencies",
    "ensure_engine_importable", "format_report", "get_parameter_node", "missing_dependencies", "panel_wording",
    "WorkerError", "WorkerJob",
]
