"""Finding and calling the Synomaly engine.

The extension build installs the engine package ``synomaly`` beside the module; a source checkout keeps
it in ``SynomalyEngine/`` next to the module folder; a developer may have it pip-installed. Everything
here imports the engine lazily, so that loading the Slicer module never imports torch.
"""
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional, Tuple

MODULE_DIR = Path(__file__).resolve().parent.parent


def engine_search_paths(module_dir: Path = MODULE_DIR) -> List[Path]:
    """Folders that may hold the ``synomaly`` package: installed beside the module, or the source tree."""
    return [module_dir, module_dir.parent / "SynomalyEngine"]


def locate_engine(module_dir: Path = MODULE_DIR) -> Optional[Path]:
    """The folder to put on sys.path for ``import synomaly``, or None when it is importable already."""
    if importlib.util.find_spec("synomaly") is not None:
        return None
    for folder in engine_search_paths(module_dir):
        if (folder / "synomaly" / "__init__.py").is_file():
            return folder
    raise ImportError(
        "The Synomaly engine (Python package 'synomaly') was not found beside the module "
        f"({', '.join(str(p) for p in engine_search_paths(module_dir))}); reinstall the extension.")


def ensure_engine_importable(module_dir: Path = MODULE_DIR) -> None:
    """Make ``import synomaly`` work, adding the bundled engine folder to sys.path if needed."""
    folder = locate_engine(module_dir)
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()


def engine_root() -> Path:
    """The folder holding the ``synomaly`` package, for a worker process's PYTHONPATH."""
    ensure_engine_importable()
    return Path(importlib.util.find_spec("synomaly").origin).resolve().parent.parent


def engine_module(name: str):
    """Import ``synomaly.<name>`` after making the engine importable."""
    ensure_engine_importable()
    return importlib.import_module(f"synomaly.{name}")


def errors():
    """The engine's error classes (a light import: no torch)."""
    return engine_module("errors")


def is_user_error(exc) -> bool:
    """Errors whose message says what to do (the panel shows them as such, without a traceback)."""
    try:
        return isinstance(exc, errors().SynomalyError)
    except ImportError:
        return False


class Engine:
    """The light engine calls the logic makes in Slicer's process (model list, settings checks, geometry);
    detection and training themselves run in a worker process (JobRunner). A test can pass another
    object with these methods."""

    def list_models(self, extra_dirs=()):
        return engine_module("files.model_file").list_models(extra_dirs=[Path(d) for d in extra_dirs])

    def default_model(self) -> str:
        return engine_module("files.model_file").default_model_name()

    def presets(self) -> List[str]:
        return list(engine_module("method.presets").PRESETS)

    def preset(self, name: str):
        """The engine's Preset of that name (what the model expects, e.g. an organ mask), or None."""
        return engine_module("method.presets").PRESETS.get(name)

    def missing_mask_message(self, preset: str) -> Optional[str]:
        """The panel's words when a model of this preset gets no mask; None when it needs none."""
        return engine_module("method.presets").missing_mask_message(preset, "slicer")

    def training_mask(self, preset: str) -> Tuple[str, Optional[str]]:
        """What every training volume of this preset needs a mask of ("" when none) and the words
        when one has none."""
        presets = engine_module("method.presets")
        return presets.mask_role(preset), presets.missing_mask_message(preset, "slicer-train")

    def model_preset(self, model) -> str:
        """The preset a model (name or path) was trained with, from its header (no weights, no torch);
        "" when it names none or cannot be read (the worker then reports why)."""
        model_file = engine_module("files.model_file")
        try:
            return str(model_file.read_metadata(model_file.resolve(model)).get("preset") or "")
        except errors().SynomalyError:
            return ""

    def detection_settings(self, **values):
        """The engine's settings object; unknown or malformed names fail here, before any work starts."""
        return engine_module("inference.detection").DetectionSettings(**values)

    def training_settings(self, **values):
        return engine_module("training.settings").TrainingSettings(**values)

    def geometry_from_ijk_to_ras(self, matrix):
        return engine_module("files.geometry").Geometry.from_ijk_to_ras(matrix)
