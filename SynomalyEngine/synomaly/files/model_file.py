"""Model files: weights and everything needed to use them, in one safetensors file.

safetensors holds tensors and a string->string header, nothing executable, so loading a model
cannot run code. The header key ``synomaly`` holds a JSON description (network, noise, schedule,
preprocessing, inference defaults, calibrated threshold, training summary).
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from synomaly.errors import ModelFileError
from synomaly.files.model_description import FORMAT, FORMAT_VERSION, check_description

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "brain-flair"
DEMO_MODEL = "demo-phantom"
USER_MODELS_ENV = "SYNOMALY_MODELS_DIR"


def user_models_dir() -> Path:
    """Where locally trained models live (CLI and Slicer alike): $SYNOMALY_MODELS_DIR or ~/.synomaly/models."""
    return Path(os.environ.get(USER_MODELS_ENV) or Path.home() / ".synomaly" / "models")


@dataclass
class ModelInfo:
    name: str
    path: Path
    description: str
    preset: str = ""  # what the model expects (presets.PRESETS): the Slicer panel asks for a mask by it


@dataclass
class SynomalyModel:
    """A loaded model: the network (in eval mode) and its description."""

    network: object
    metadata: Dict
    path: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.metadata.get("name", "unnamed")

    @property
    def model_id(self) -> str:
        return self.metadata.get("model_id", "")

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def preset(self) -> str:
        return self.metadata.get("preset", "")

    def to(self, device):
        self.network.to(device)
        return self


# What, beside the weights, shapes a model's output: a recalibrated model is another model.
ID_KEYS = ("preprocessing", "schedule", "inference", "threshold")


def model_id_of(state_dict, metadata: Dict) -> str:
    """A content hash of the weights (torch tensors or numpy arrays) and of the settings that shape the output
    (``ID_KEYS``): the same model always gets the same id, and new inference settings or a new threshold give
    a new one."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if hasattr(value, "detach"):
            value = value.detach().cpu().contiguous().numpy()
        h.update(key.encode())
        h.update(np.ascontiguousarray(value).tobytes())
    h.update(json.dumps({k: metadata.get(k) for k in ID_KEYS}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def file_model_id(path) -> str:
    """The id a model file's weights and settings give, read with numpy (no torch: Slicer's process verifies
    model files with it); compare it with the id the file declares (``read_metadata(path)["model_id"]``)."""
    from safetensors import safe_open

    metadata = read_metadata(path)
    with safe_open(str(path), framework="numpy") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    return model_id_of(state, metadata)


def save_model(path, network, metadata: Dict) -> Path:
    """Write atomically; fills in format, version and model_id (``model_id_of``). Weights are stored in float16
    (half the size; inference differences are far below the map's noise) and loaded as float32."""
    import torch
    from safetensors.torch import save

    from synomaly.files.volume_io import atomic_write_bytes

    state = {k: v.detach().cpu().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in network.state_dict().items()}
    meta = dict(metadata)
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": model_id_of(state, meta)})
    meta["network"] = network.config.to_dict()
    path = Path(path)
    atomic_write_bytes(path, save(state, metadata={"synomaly": json.dumps(meta)}))
    return path


def list_models(extra_dirs=()) -> List[ModelInfo]:
    """Bundled models, then the user's models folder, then ``extra_dirs``."""
    out = []
    folders = [BUNDLED_DIR, user_models_dir(), *[Path(d) for d in extra_dirs]]
    for folder in dict.fromkeys(f.resolve() for f in folders if f.is_dir()):
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                meta = read_metadata(path)
            except ModelFileError:
                continue
            out.append(ModelInfo(path.stem, path, meta.get("description", ""), str(meta.get("preset", ""))))
    return out


def default_model_name() -> str:
    """The brain FLAIR model once it is bundled; the phantom demo model until then."""
    return DEFAULT_MODEL if (BUNDLED_DIR / f"{DEFAULT_MODEL}.safetensors").exists() else DEMO_MODEL


def resolve(name_or_path) -> Path:
    if name_or_path is None:
        name_or_path = default_model_name()
    candidate = Path(str(name_or_path)).expanduser()
    if candidate.suffix == ".safetensors" or candidate.exists() or "/" in str(name_or_path):
        if not candidate.exists():
            raise ModelFileError(f"model file {candidate} does not exist.")
        if not candidate.is_file():
            raise ModelFileError(f"{candidate} is a folder, not a model file; give a .safetensors file or a "
                                 "model's name.")
        return candidate
    for folder in (BUNDLED_DIR, user_models_dir()):
        if (folder / f"{name_or_path}.safetensors").exists():
            return folder / f"{name_or_path}.safetensors"
    names = ", ".join(m.name for m in list_models()) or "none"
    raise ModelFileError(f"no model named {name_or_path!r}; known models: {names}; "
                         "or give a path to a .safetensors file.")


def read_metadata(path) -> Dict:
    """The model description, without loading the weights (or importing torch)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable model file ({type(exc).__name__}: {exc}); "
                             "it may be corrupt or truncated: download or train it again.") from None
    if "synomaly" not in header:
        raise ModelFileError(f"{path} is a safetensors file but not a Synomaly model (no 'synomaly' header).")
    try:
        meta = json.loads(header["synomaly"], parse_constant=lambda name: name)  # NaN stays a text, and is refused
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the model description is corrupt.") from None
    return check_description(meta, path)


def load_model(name_or_path=None, device="cpu") -> SynomalyModel:
    """Load a bundled model by name (default: ``default_model_name()``) or a file by path; no code runs.

    The description is checked first (``model_description``), then the weights' names and shapes in the
    file's header against the described network (built on the meta device: nothing allocated), then the
    weights themselves: finite, and hashing to the model's id, so that an altered file is never answered
    under the name of the model it claims to be."""
    import torch
    from safetensors.torch import load_file

    from synomaly.method.network import UNet, UNetConfig, config_problem

    path = resolve(name_or_path)
    meta = read_metadata(path)
    config = UNetConfig.from_dict(meta["network"])
    problem = config_problem(config)
    if problem:
        raise ModelFileError(f"{path}: the described network cannot be built ({problem}).")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    stored = _stored_shapes(path)
    mismatch = sorted(set(expected) ^ set(stored)) or [k for k in expected if expected[k] != stored[k]]
    if mismatch:
        k = mismatch[0]
        raise ModelFileError(f"{path}: the weights do not match the described network ({len(mismatch)} differ, "
                             f"e.g. {k}: stored {stored.get(k, 'none')}, described {expected.get(k, 'none')}); "
                             "the file is damaged or altered: download or train it again.")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several kinds for a damaged file
        raise ModelFileError(f"{path}: the weights cannot be read ({type(exc).__name__}: {exc}); the file is damaged "
                             "or truncated: download or train it again.") from None
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ModelFileError(f"{path}: holds NaN or infinite weights (a diverged training, or a damaged file); "
                             "train it again.")
    if model_id_of(state, meta) != meta["model_id"]:
        raise ModelFileError(f"{path}: its weights and settings do not give its id {meta['model_id']} (the file was "
                             "altered or damaged after it was written); download or train it again.")
    network = UNet(config)
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    network.eval().requires_grad_(False)
    return SynomalyModel(network.to(device), meta, path)


def _stored_shapes(path: Path) -> Dict:
    """Each weight's shape as the file's header states it, without reading the weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
