"""Detection and training on scene nodes, without Qt: used by the widget, the Python console and tests.

Each run has three parts: ``prepare_*`` (main thread: checks the inputs and copies them out of the
nodes), ``run_*`` (any thread: only the engine and numpy arrays) and ``apply_*`` (main thread: writes
nodes). ``detect``/``train`` chain them in the calling thread; ``start_*`` put the middle part on a
worker thread and return a BackgroundJob to poll.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import slicer

from . import MrmlBridge
from .Engine import Engine, errors
from .JobRunner import BackgroundJob
from .LossCurve import LossCurve
from .Models import ModelEntry, available_models, default_user_models_dir, model_file_name
from .Parameters import Parameters, get_parameter_node


@dataclass
class DetectionRequest:
    input_node: object
    volume: object
    geometry: object
    mask: object
    model: object  # identifier for load_model, or a loaded model
    settings: object
    reuse: Optional[MrmlBridge.OutputNodes]


@dataclass
class TrainingRequest:
    healthy: list
    output: Path
    settings: object
    resume: bool


class SynomalyLogic:
    def __init__(self, engine=None, user_models_dir=None, scene=None):
        """``engine``: the object the engine calls go through (Engine by default; tests may pass another);
        ``scene``: the MRML scene (slicer.mrmlScene at the time of each call by default)."""
        self.engine = engine if engine is not None else Engine()
        self.user_models_dir = Path(user_models_dir) if user_models_dir else default_user_models_dir()
        self._scene = scene
        self._loaded_model = None
        self.loss_curve: Optional[LossCurve] = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # models and parameters

    def models(self) -> List[ModelEntry]:
        return available_models(self.engine, self.user_models_dir)

    def default_model(self) -> str:
        return self.engine.default_model()

    def parameter_node(self):
        return get_parameter_node(self.scene)

    def parameters(self) -> Parameters:
        return Parameters.from_node(self.parameter_node())

    def save_parameters(self, parameters: Parameters) -> None:
        parameters.to_node(self.parameter_node())

    def check_model(self, model=None) -> None:
        """Fail early, without loading weights, when a model name or path leads nowhere."""
        if model is not None and not isinstance(model, (str, Path)):
            return
        key = str(model) if model else self.default_model()
        if Path(key).expanduser().is_file():
            return
        bundled = [entry.name for entry in self.models() if entry.bundled]
        if key not in bundled:
            raise errors().ModelFileError(
                f"No model {key!r}: it is neither a model file nor a bundled model "
                f"(bundled: {', '.join(bundled) or 'none installed'}). Pick a model from the list.")

    def load_model(self, model=None):
        """The loaded model; the last one is kept, since loading imports torch and reads the weights.
        A model file rewritten since (a resumed training) is loaded again."""
        if model is not None and not isinstance(model, (str, Path)):
            return model
        name = str(model) if model else self.default_model()
        path = Path(name).expanduser()
        key = (name, path.stat().st_mtime_ns if path.is_file() else None)
        if self._loaded_model is None or self._loaded_model[0] != key:
            self._loaded_model = (key, self.engine.load_model(name, device="cpu"))
        return self._loaded_model[1]

    # detection

    def prepare_detection(self, volumeNode, maskNode=None, model=None, outputs=None,
                          **settings) -> DetectionRequest:
        """Check everything that can be checked before the long run, and copy the inputs out of the nodes."""
        MrmlBridge.check_input_volume(volumeNode)
        MrmlBridge.check_mask(maskNode)
        self.check_model(model)
        try:
            engine_settings = self.engine.detection_settings(**settings)
        except TypeError as exc:
            raise errors().InputError(f"Unknown detection setting: {exc}.") from None
        geometry = self.engine.geometry_from_ijk_to_ras(MrmlBridge.ijk_to_ras(volumeNode))
        return DetectionRequest(volumeNode, MrmlBridge.volume_to_array(volumeNode), geometry,
                                MrmlBridge.mask_to_array(maskNode, volumeNode), model, engine_settings, outputs)

    def run_detection(self, request: DetectionRequest, progress=None, cancel=None):
        """The engine call; touches no node, so it may run on a worker thread."""
        model = self.load_model(request.model)
        return self.engine.detect(request.volume, request.geometry, model, mask=request.mask,
                                  settings=request.settings, progress=progress, cancel=cancel)

    def apply_detection(self, request: DetectionRequest, result) -> MrmlBridge.OutputNodes:
        if request.input_node.GetScene() is None:
            raise errors().InputError(f"The input volume '{request.input_node.GetName()}' was removed during "
                                      "the run; nothing was added.")
        return MrmlBridge.write_outputs(request.input_node, result, request.reuse)

    def detect(self, volumeNode, maskNode=None, model=None, outputs=None, progress=None, cancel=None,
               **settings) -> MrmlBridge.OutputNodes:
        """Detect anomalies in ``volumeNode``; return the output nodes (and the report).

        ``model``: a model name, a model file path or a loaded model (default: the engine's default
        model); ``outputs``: earlier outputs to overwrite instead of creating new nodes; ``settings``:
        the engine's DetectionSettings (device, stages, noise_level, threshold, ensemble...).
        Blocks until done; the input node is not modified.
        """
        request = self.prepare_detection(volumeNode, maskNode, model, outputs, **settings)
        return self.apply_detection(request, self.run_detection(request, progress, cancel))

    def start_detection(self, parameters: Parameters, on_progress: Optional[Callable] = None) -> BackgroundJob:
        """Detection in the background from the panel's settings; on success the parameter node
        remembers the outputs and the report. ``on_progress(fraction, message)`` runs on the polling thread."""
        reuse = None
        if parameters.update_outputs and parameters.input_volume is not None:
            reuse = MrmlBridge.reusable_outputs(parameters.input_volume, parameters.segmentation,
                                                parameters.counterfactual, parameters.anomaly_map)
        request = self.prepare_detection(parameters.input_volume, parameters.mask, parameters.model or None,
                                         reuse, **parameters.detection_settings())

        def finish(result):
            outputs = self.apply_detection(request, result)
            stored = self.parameters()
            stored.segmentation, stored.counterfactual, stored.anomaly_map = (
                outputs.segmentation, outputs.counterfactual, outputs.anomaly_map)
            stored.last_report = json.dumps(outputs.report or {}, default=str)
            self.save_parameters(stored)
            return outputs

        return BackgroundJob(lambda progress, cancel: self.run_detection(request, progress, cancel),
                             finish, on_progress, errors().Cancelled, "Synomaly detection").start()

    # training

    def prepare_training(self, healthy, name: str, preset: str = "brain-flair", steps: Optional[int] = None,
                         device: str = "auto", resume: bool = False, **settings) -> TrainingRequest:
        """``healthy``: a folder or file path, a list of them, or a list of scalar volume nodes."""
        output = self.user_models_dir / model_file_name(name)
        values = dict(settings, preset=preset, device=device, name=name)
        if steps:
            values["steps"] = int(steps)
        try:
            engine_settings = self.engine.training_settings(**values)
        except TypeError as exc:
            raise errors().InputError(f"Unknown training setting: {exc}.") from None
        if preset not in self.engine.presets():
            raise errors().InputError(f"Unknown preset {preset!r}; choose one of {', '.join(self.engine.presets())}.")
        return TrainingRequest(self._healthy_cases(healthy), output, engine_settings, resume)

    def _healthy_cases(self, healthy) -> list:
        InputError = errors().InputError
        if isinstance(healthy, (str, Path)):
            healthy = [healthy]
        healthy = list(healthy or [])
        if not healthy:
            raise InputError("No healthy cases: choose a folder of healthy volumes or select loaded volumes.")
        if all(isinstance(item, (str, Path)) for item in healthy):
            missing = [str(p) for p in healthy if not Path(p).exists()]
            if missing:
                raise InputError(f"Not found: {', '.join(missing)}.")
            return [Path(p) for p in healthy]
        cases = []
        for node in healthy:
            if isinstance(node, (str, Path)):
                raise InputError("Give either paths or volume nodes as healthy cases, not both.")
            MrmlBridge.check_input_volume(node)
            geometry = self.engine.geometry_from_ijk_to_ras(MrmlBridge.ijk_to_ras(node))
            cases.append(self.engine.training_case(node.GetName(), MrmlBridge.volume_to_array(node), geometry))
        return cases

    def run_training(self, request: TrainingRequest, progress=None, cancel=None) -> Path:
        request.output.parent.mkdir(parents=True, exist_ok=True)
        return Path(self.engine.train(request.healthy, request.output, request.settings, progress=progress,
                                      cancel=cancel, resume=request.resume))

    def model_entry(self, path: Path) -> ModelEntry:
        """The list entry of a freshly trained model (the list is re-read, so it includes it)."""
        for entry in self.models():
            if not entry.bundled and Path(entry.identifier).resolve() == Path(path).resolve():
                return entry
        return ModelEntry(Path(path).stem, str(path), "", False)

    def train(self, healthy, name: str, preset: str = "brain-flair", steps: Optional[int] = None,
              device: str = "auto", resume: bool = False, progress=None, cancel=None, **settings) -> ModelEntry:
        """Train a model on healthy cases into the user models folder; return its entry in the model list.

        ``progress(step, total, loss, message)``; ``resume=True`` continues a cancelled or killed run
        of the same name. Blocks until done.
        """
        request = self.prepare_training(healthy, name, preset, steps, device, resume, **settings)
        return self.model_entry(self.run_training(request, progress, cancel))

    def start_training(self, parameters: Parameters, resume: bool = False,
                       on_progress: Optional[Callable] = None) -> BackgroundJob:
        """Training in the background from the panel's settings, drawing the loss into a plot.

        ``on_progress(step, total, loss, message)`` runs on the polling thread, after the plot is updated.
        """
        healthy = parameters.training_folder if parameters.training_from_folder else parameters.training_volumes
        request = self.prepare_training(healthy, parameters.model_name, parameters.preset, parameters.steps,
                                        parameters.training_device, resume)
        curve = LossCurve(self.scene, parameters.loss_table)
        if not resume:
            curve.clear()
        stored = self.parameters()
        stored.loss_table = curve.table
        self.save_parameters(stored)

        def progress(step, total, loss, message):
            curve.add(step, loss)
            if on_progress is not None:
                on_progress(step, total, loss, message)

        self.loss_curve = curve
        return BackgroundJob(lambda report, cancel: self.run_training(request, report, cancel),
                             self.model_entry, progress, errors().Cancelled, "Synomaly training").start()


def format_report(report: Optional[dict]) -> str:
    """The panel's summary of a detection report."""
    if not report:
        return ""
    components = report.get("components") or []
    lines = [f"Anomalous volume: {report.get('anomalous_volume_ml', 0.0):.2f} mL "
             f"in {report.get('n_components', len(components))} component(s)"]
    for index, component in enumerate(components[:5], start=1):
        lines.append(f"  #{index}: {float(component.get('volume_ml', 0.0)):.2f} mL")
    if len(components) > 5:
        lines.append(f"  ... and {len(components) - 5} more")
    if "max_score" in report:
        lines.append(f"Max score: {report['max_score']:.3f}, mean score: {report.get('mean_score', 0.0):.3f}")
    if "threshold" in report:
        lines.append(f"Threshold: {report['threshold']:.3f} ({report.get('threshold_source', 'model')})")
    model = report.get("model") or {}
    if model:
        lines.append(f"Model: {model.get('name', '')} ({model.get('model_id', '')})")
    return "\n".join(lines)
