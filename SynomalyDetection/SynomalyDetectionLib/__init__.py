"""Qt-free part of the Synomaly Detection module: parameters, MRML bridge, job runner, models, logic.

Nothing here imports torch at import time; the engine is imported when a run needs it.
"""
from .Dependencies import MissingDependencies, ensure_dependencies, missing_dependencies
from .Engine import Engine, ensure_engine_importable
from .JobRunner import BackgroundJob
from .Logic import SynomalyLogic, format_report
from .LossCurve import LossCurve
from .Models import ModelEntry, available_models, default_user_models_dir
from .MrmlBridge import OutputNodes
from .Parameters import MODULE_NAME, Parameters, get_parameter_node

__all__ = [
    "BackgroundJob", "Engine", "LossCurve", "MODULE_NAME", "MissingDependencies", "ModelEntry", "OutputNodes",
    "Parameters", "SynomalyLogic", "available_models", "default_user_models_dir", "ensure_dependencies",
    "ensure_engine_importable", "format_report", "get_parameter_node", "missing_dependencies",
]
