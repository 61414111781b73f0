"""The models a user can pick: those bundled with the engine, then those trained locally; checking a
model file against its id, and deleting a locally trained one."""
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .Engine import engine_module, errors

USER_MODELS_ENV = "SYNOMALY_MODELS_DIR"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    identifier: str  # what load_model takes: a bundled model's name, or a user model's file path
    description: str
    bundled: bool
    preset: str = ""  # the engine's preset the model was trained with: it says whether a mask is needed

    @property
    def label(self) -> str:
        return self.name if self.bundled else f"{self.name} (trained here)"


def default_user_models_dir() -> Path:
    """Where trained models go: $SYNOMALY_MODELS_DIR, else ~/.synomaly/models (shared with the CLI user)."""
    return Path(os.environ.get(USER_MODELS_ENV) or Path.home() / ".synomaly" / "models")


def available_models(engine, user_models_dir: Path) -> List[ModelEntry]:
    """Bundled models by name, then user models by path, so a user model never shadows a bundled one."""
    user_dir = Path(user_models_dir)
    extra = [user_dir] if user_dir.is_dir() else []
    entries = []
    for info in engine.list_models(extra_dirs=extra):
        bundled = Path(info.path).resolve().parent != user_dir.resolve()
        identifier = info.name if bundled else str(info.path)
        entries.append(ModelEntry(info.name, identifier, info.description, bundled, info.preset))
    return entries


def model_file_name(name: str) -> str:
    """A safe file name for a model the user names: letters, digits, '-', '_' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    if not cleaned:
        raise errors().InputError("Give the new model a name (letters, digits, '-' or '_').")
    return cleaned + ".safetensors"


def computed_model_id(path) -> str:
    """The id of the weights and settings in the file, as the engine computes it when it saves a model,
    read with numpy: no torch in Slicer's process."""
    return engine_module("files.model_file").file_model_id(path)


def verify_model_file(path) -> str:
    """"" when the file's weights and settings give the id it declares, else what is wrong with it."""
    path = Path(path)
    try:
        declared = str(engine_module("files.model_file").read_metadata(path).get("model_id") or "")
        computed = computed_model_id(path)
    except errors().SynomalyError as exc:
        return str(exc)
    except Exception as exc:  # a damaged tensor block: safetensors' own error
        return f"{path} cannot be read ({type(exc).__name__}: {exc}); download or train it again."
    if declared != computed:
        return (f"{path.name} does not match its id (declared {declared or 'none'}, its contents give "
                f"{computed}): it was changed or damaged; download or train it again.")
    return ""


def delete_user_model(path, user_models_dir: Path) -> List[Path]:
    """Delete a model trained here, with its training run folder (checkpoint); bundled models and files
    outside the user models folder are refused. Returns what was deleted."""
    path, folder = Path(path).resolve(), Path(user_models_dir).resolve()
    if path.parent != folder or path.suffix != ".safetensors":
        raise errors().InputError(f"Only models trained here ({folder}) can be deleted, not {path}.")
    run_dir = engine_module("training.checkpoints").run_dir_for(path)
    deleted = [p for p in (path, run_dir) if p.exists()]
    if not deleted:
        raise errors().InputError(f"No model file {path}.")
    for item in deleted:
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    return deleted
