"""The models a user can pick: those bundled with the engine, then those trained locally."""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .Engine import errors

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
