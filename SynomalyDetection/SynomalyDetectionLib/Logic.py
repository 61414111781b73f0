"""Detection and training on scene nodes, without Qt: used by the widget, the Python console and tests.

Each run has three parts: ``prepare_*`` (main thread: checks the inputs and copies them out of the
nodes), the engine in a worker process (``python -m synomaly.commands.worker``; the inputs and outputs are files
in a job folder) and ``apply_*`` (main thread: writes nodes). ``start_*`` return the running WorkerJob
(several volumes: a DetectionBatch of them, polled alike), which the caller polls; ``detect``/``train``
start the same job and wait for it. Nothing here runs the engine in Slicer's process, so torch is never
imported there and Slicer's GIL never slows a run.
"""
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import slicer

from . import MrmlBridge
from .Batch import DetectionBatch
from .Dependencies import missing_dependencies
from .Engine import Engine, engine_module, errors
from .JobFiles import read_nrrd_array, write_nrrd
from .JobRunner import WorkerJob, new_job_folder
from .LossCurve import LossCurve
from .Messages import panel_wording
from .Models import (ModelEntry, available_models, default_user_models_dir, delete_user_model, model_file_name,
                     verify_model_file)
from .Parameters import Parameters, get_parameter_node

# How long a cancelled training run may take to save its checkpoint and stop before it is killed.
TRAINING_GRACE_S = 30.0


@dataclass
class DetectionRequest:
    input_node: object
    volume: np.ndarray
    geometry: object
    mask: Optional[np.ndarray]
    model: str  # a bundled model's name or a model file's path
    settings: dict  # the engine's DetectionSettings, as values
    reuse: Optional[MrmlBridge.OutputNodes]


@dataclass
class HealthyVolume:
    """A healthy case copied out of a volume node, with its mask on the volume's grid where it has one."""

    name: str
    array: np.ndarray
    geometry: object
    mask: Optional[np.ndarray] = None


@dataclass
class TrainingRequest:
    healthy: list  # paths, or HealthyVolume copies of volume nodes
    output: Path
    settings: dict  # TrainingSettings values given by the caller (the rest are the engine's defaults)
    resume: bool


class SynomalyLogic:
    def __init__(self, engine=None, user_models_dir=None, scene=None, **kwargs):
        """``engine``: the object the light engine calls go through (Engine by default; tests may pass
        another); ``scene``: the MRML scene (slicer.mrmlScene at the time of each call by default).
        Other keyword arguments go to the next class in a subclass's bases (Slicer's module logic)."""
        super().__init__(**kwargs)
        self.engine = engine if engine is not None else Engine()
        self.user_models_dir = Path(user_models_dir) if user_models_dir else default_user_models_dir()
        self._scene = scene
        self.loss_curve: Optional[LossCurve] = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # models and parameters

    def models(self) -> List[ModelEntry]:
        return available_models(self.engine, self.user_models_dir)

    def default_model(self) -> str:
        return self.engine.default_model()

    def default_model_name(self) -> str:
        """The default model's name; "" when the engine cannot be imported (the run then says why)."""
        try:
            return self.default_model()
        except ImportError:
            return ""

    def preset_names(self) -> List[str]:
        """The engine's presets; the default one alone when the engine cannot be imported (logged)."""
        try:
            return self.engine.presets()
        except ImportError as exc:
            logging.warning(f"Synomaly presets unavailable: {exc}")
            return [Parameters().preset]

    def model_choices(self) -> List[ModelEntry]:
        """The panel's model list: [] until the engine's packages are installed (reading model files needs
        them) or when the list cannot be read (logged); the panel then offers the default model."""
        if missing_dependencies().any:
            return []
        try:
            return self.models()
        except Exception as exc:
            logging.warning(f"Synomaly models could not be listed: {exc}")
            return []

    def is_user_model(self, identifier) -> bool:
        """A model trained here (in the user models folder): the only kind the panel may delete."""
        return bool(identifier) and Path(str(identifier)).parent.resolve() == self.user_models_dir.resolve()

    def model_path(self, model) -> Path:
        """The file of a model of the list (name or path)."""
        return engine_module("files.model_file").resolve(self.check_model(model))

    def verify_model(self, model) -> str:
        """"" when the model file matches its id (its weights and settings are those it was saved with),
        else what is wrong."""
        return verify_model_file(self.model_path(model))

    def delete_model(self, model) -> List[Path]:
        """Delete a model trained here and its training run folder; a bundled model is refused."""
        return delete_user_model(self.model_path(model), self.user_models_dir)

    def parameter_node(self):
        return get_parameter_node(self.scene)

    def parameters(self) -> Parameters:
        return Parameters.from_node(self.parameter_node())

    def save_parameters(self, parameters: Parameters) -> None:
        parameters.to_node(self.parameter_node())

    def check_model(self, model=None) -> str:
        """The model's identifier for the worker; fails early, without loading weights, when a model name
        or path leads nowhere."""
        if model is not None and not isinstance(model, (str, Path)):
            raise errors().InputError("Give the model as a model name or a model file path; the engine runs in "
                                      "a worker process, which loads it itself.")
        key = str(model) if model else self.default_model()
        path = Path(key).expanduser()
        if path.is_file():
            return str(path.resolve())
        bundled = [entry.name for entry in self.models() if entry.bundled]
        if key not in bundled:
            raise errors().ModelFileError(
                f"No model {key!r}: it is neither a model file nor a bundled model "
                f"(bundled: {', '.join(bundled) or 'none installed'}). Pick a model from the list.")
        return key

    def model_preset(self, model=None) -> str:
        """The preset a model was trained with ("" when its file names none), from the model list or, for a
        model file outside it, from the file's header: no weights are loaded."""
        key = self.check_model(model)
        for entry in self.models():
            if entry.identifier == key or (not entry.bundled and Path(entry.identifier).resolve() == Path(key)):
                return entry.preset
        return self.engine.model_preset(key)

    def missing_mask(self, model=None, maskNode=None) -> str:
        """Why ``model`` cannot run without a mask, in the panel's words ("" when it can, or has one): a model
        whose preset names an organ (liver-ct) analyses that organ only."""
        if maskNode is not None:
            return ""
        return self.engine.missing_mask_message(self.model_preset(model)) or ""

    def detection_blocker(self, parameters: Parameters) -> str:
        """Why the panel's Detect button is disabled ("" when it may run). A model that cannot be read here
        blocks nothing: the run itself then says what is wrong with it."""
        if parameters.several_inputs and not parameters.input_volumes:
            return "Check the volumes to analyse."
        if parameters.input_volume is None and not parameters.several_inputs:
            return "Choose an input volume."
        try:
            return self.missing_mask(parameters.model or None, parameters.mask)
        except (ImportError, errors().SynomalyError):
            return ""

    # detection

    def prepare_detection(self, volumeNode, maskNode=None, model=None, outputs=None,
                          **settings) -> DetectionRequest:
        """Check everything that can be checked before the long run, and copy the inputs out of the nodes.
        A model whose preset names an organ (liver-ct) needs a mask; of a segmentation with several segments
        it takes the one named after the organ."""
        MrmlBridge.check_input_volume(volumeNode)
        MrmlBridge.check_mask(maskNode)
        model = self.check_model(model)
        preset = self.model_preset(model)
        missing = self.engine.missing_mask_message(preset) if maskNode is None else None
        if missing:
            raise errors().InputError(missing)
        organ = getattr(self.engine.preset(preset), "organ", "")
        MrmlBridge.check_dimensions(volumeNode, preset or None)
        try:
            engine_settings = self.engine.detection_settings(**settings)
        except TypeError as exc:
            raise errors().InputError(f"Unknown detection setting: {exc}.") from None
        geometry = self.engine.geometry_from_ijk_to_ras(MrmlBridge.ijk_to_ras(volumeNode))
        return DetectionRequest(volumeNode, MrmlBridge.volume_to_array(volumeNode), geometry,
                                MrmlBridge.mask_to_array(maskNode, volumeNode, organ), model,
                                dataclasses.asdict(engine_settings), outputs)

    def prepare_panel_detection(self, parameters: Parameters) -> DetectionRequest:
        """The request the panel's settings describe; with "update outputs", the last outputs of the same
        input are overwritten."""
        reuse = None
        if parameters.update_outputs and parameters.input_volume is not None:
            reuse = MrmlBridge.reusable_outputs(parameters.input_volume, parameters.segmentation,
                                                parameters.counterfactual, parameters.anomaly_map,
                                                parameters.uncertainty)
        return self.prepare_detection(parameters.input_volume, parameters.mask, parameters.model or None,
                                      reuse, **parameters.detection_settings())

    def start_detection_job(self, request: DetectionRequest, on_progress: Optional[Callable] = None,
                            remember: bool = False) -> WorkerJob:
        """Write the inputs into a job folder and start the worker; ``apply_detection`` runs when it is done.
        ``on_progress(fraction, message)`` runs on the polling thread."""
        folder = new_job_folder()
        try:
            _write_job_volume(folder / "input.nrrd", request.volume, request.geometry)
            mask = None
            if request.mask is not None:
                mask = "mask.nrrd"
                _write_job_volume(folder / mask, request.mask.astype(np.uint8), request.geometry)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = {"kind": "detection", "input": "input.nrrd", "mask": mask, "model": request.model,
               "settings": request.settings}
        return WorkerJob(folder, job, lambda result: self.apply_detection(request, read_detection_result(result),
                                                                          remember),
                         on_progress).start()

    def apply_detection(self, request: DetectionRequest, result, remember: bool = False) -> MrmlBridge.OutputNodes:
        """Write the output nodes; ``remember``: the parameter node keeps them and the report (the panel)."""
        if request.input_node.GetScene() is None:
            raise errors().InputError(f"The input volume '{request.input_node.GetName()}' was removed during "
                                      "the run; nothing was added.")
        outputs = MrmlBridge.write_outputs(request.input_node, result, request.reuse)
        if remember:
            stored = self.parameters()
            stored.segmentation, stored.counterfactual, stored.anomaly_map, stored.uncertainty = (
                outputs.segmentation, outputs.counterfactual, outputs.anomaly_map, outputs.uncertainty)
            stored.last_report = json.dumps(outputs.report or {}, default=str)
            self.save_parameters(stored)
        return outputs

    def detect(self, volumeNode, maskNode=None, model=None, outputs=None, progress=None, cancel=None,
               **settings) -> MrmlBridge.OutputNodes:
        """Detect anomalies in ``volumeNode``; return the output nodes (and the report).

        ``model``: a model name or a model file path (default: the engine's default model); ``outputs``:
        earlier outputs to overwrite instead of creating new nodes; ``settings``: the engine's
        DetectionSettings (device, stages, noise_level, threshold, ensemble...). ``progress(fraction,
        message)`` is called here while waiting, ``cancel()`` is asked between polls. Runs in a worker
        process and blocks until done; the input node is not modified.
        """
        request = self.prepare_detection(volumeNode, maskNode, model, outputs, **settings)
        return self.start_detection_job(request, progress).wait(cancel=cancel)

    def detect_many(self, volumeNodes, maskNode=None, model=None, replace: bool = False, progress=None,
                    cancel=None, **settings) -> List[MrmlBridge.OutputNodes]:
        """``detect`` on several volumes, one after the other; every input is checked before the first run.
        ``replace``: each volume's last outputs are overwritten instead of adding new nodes.
        ``progress(fraction of the whole batch, message)``. A failure or a cancel stops the batch; the
        outputs of the volumes done by then stay. The panel runs the same DetectionBatch without waiting."""
        return self.start_detection_batch(volumeNodes, maskNode, model, replace, progress, **settings).wait(
            cancel=cancel)

    def start_detection_batch(self, volumeNodes, maskNode=None, model=None, replace: bool = False,
                              on_progress: Optional[Callable] = None, remember: bool = False,
                              **settings) -> DetectionBatch:
        """The running batch of ``detect_many`` (see DetectionBatch), polled like a WorkerJob."""
        return DetectionBatch(self, volumeNodes, maskNode, model, replace, on_progress, remember, **settings).start()

    def check_detection_input(self, volumeNode, maskNode=None, model=None) -> None:
        """The checks of ``prepare_detection`` that copy nothing: the volume, the mask, the model and
        whether it needs a mask."""
        MrmlBridge.check_input_volume(volumeNode)
        MrmlBridge.check_mask(maskNode)
        preset = self.model_preset(model)
        missing = self.engine.missing_mask_message(preset) if maskNode is None else None
        if missing:
            raise errors().InputError(missing)
        MrmlBridge.check_dimensions(volumeNode, preset or None)

    def start_detection(self, parameters: Parameters, on_progress: Optional[Callable] = None):
        """Detection in a worker process from the panel's settings; on success the parameter node
        remembers the outputs and the report. ``on_progress(fraction, message)`` runs on the polling thread.
        With "several volumes", the checked volumes run as a DetectionBatch ("update outputs": each one's
        last outputs are overwritten), whose result is the list of their outputs."""
        if parameters.several_inputs:
            return self.start_detection_batch(parameters.input_volumes, parameters.mask, parameters.model or None,
                                              parameters.update_outputs, on_progress, remember=True,
                                              **parameters.detection_settings())
        return self.start_detection_job(self.prepare_panel_detection(parameters), on_progress, remember=True)

    # training

    def prepare_training(self, healthy, name: str, preset: str = "brain-flair", steps: Optional[int] = None,
                         device: str = "auto", resume: bool = False, **settings) -> TrainingRequest:
        """``healthy``: a folder or file path, a list of them, or a list of scalar volume nodes or of
        ``(volume node, mask node)`` pairs (the mask a segmentation or label map)."""
        output = self.user_models_dir / model_file_name(name)
        values = dict(settings, preset=preset, device=device, name=name)
        if steps:
            values["steps"] = int(steps)
        try:
            self.engine.training_settings(**values)
        except TypeError as exc:
            raise errors().InputError(f"Unknown training setting: {exc}.") from None
        if preset not in self.engine.presets():
            raise errors().InputError(f"Unknown preset {preset!r}; choose one of {', '.join(self.engine.presets())}.")
        return TrainingRequest(self._healthy_cases(healthy, preset), output, values, resume)

    def _healthy_cases(self, healthy, preset: str) -> list:
        """Paths as they are; volume nodes (or ``(volume, mask)`` pairs) copied out. A preset that needs a
        mask (liver-ct: the liver) takes each volume's from the pair, or else from the segmentation made on
        that volume (``MrmlBridge.training_mask_node``); none found is an error naming the volumes."""
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
            return [Path(p).resolve() for p in healthy]
        role, mask_needed = self.engine.training_mask(preset)
        cases, unmasked = [], []
        for item in healthy:
            node, mask_node = tuple(item) if isinstance(item, (tuple, list)) else (item, None)
            if isinstance(node, (str, Path)):
                raise InputError("Give either paths or volume nodes as healthy cases, not both.")
            MrmlBridge.check_input_volume(node)
            MrmlBridge.check_dimensions(node, preset)
            MrmlBridge.check_mask(mask_node)
            if mask_node is None and role:
                mask_node = MrmlBridge.training_mask_node(node, role)
            if mask_node is None and mask_needed:
                unmasked.append(node.GetName())
                continue
            geometry = self.engine.geometry_from_ijk_to_ras(MrmlBridge.ijk_to_ras(node))
            mask = MrmlBridge.mask_to_array(mask_node, node, role) if mask_node is not None else None
            cases.append(HealthyVolume(node.GetName(), MrmlBridge.volume_to_array(node), geometry, mask))
        if unmasked:
            shown = ", ".join(f"'{name}'" for name in unmasked[:5]) + (", ..." if len(unmasked) > 5 else "")
            raise InputError(f"No {role} mask for {len(unmasked)} of {len(healthy)} volumes ({shown}): {mask_needed}")
        return cases

    def start_training_job(self, request: TrainingRequest, on_progress: Optional[Callable] = None,
                           after_progress: Optional[Callable[[], None]] = None) -> WorkerJob:
        """Write volume-node cases into a job folder and start the worker; the job's result is the new
        model's entry in the model list. ``on_progress(step, total, loss, message)`` runs on the polling thread."""
        folder = new_job_folder()
        try:
            healthy = []
            for index, case in enumerate(request.healthy):
                if isinstance(case, HealthyVolume):
                    image = f"case-{index:03d}.nrrd"
                    _write_job_volume(folder / image, case.array, case.geometry)
                    healthy.append({"name": case.name, "image": image})
                    if case.mask is not None:
                        healthy[-1]["mask"] = f"case-{index:03d}-mask.nrrd"
                        _write_job_volume(folder / healthy[-1]["mask"], case.mask.astype(np.uint8), case.geometry)
                else:
                    healthy.append(str(case))
            try:
                request.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise errors().OutputError(f"The models folder {request.output.parent} cannot be created "
                                           f"({exc.strerror or exc}); set SYNOMALY_MODELS_DIR to a writable "
                                           "folder.") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = {"kind": "training", "healthy": healthy, "output": str(request.output), "settings": request.settings,
               "resume": request.resume}
        return WorkerJob(folder, job, lambda result: self.model_entry(Path(result["model"])), on_progress,
                         grace_s=TRAINING_GRACE_S, after_progress=after_progress).start()

    def training_blocker(self, parameters: Parameters, resume: bool = False) -> str:
        """Why the panel's Start (or Resume) training button is disabled ("" when it may run): no healthy
        cases, or, for Resume, no checkpoint of a run of that name to continue."""
        if not parameters.training_source():
            return "Choose a folder of healthy volumes, or check loaded volumes."
        if not resume:
            return ""
        try:
            output = self.user_models_dir / model_file_name(parameters.model_name)
            checkpoint = engine_module("training.checkpoints").run_dir_for(output) / "checkpoint.pt"
        except ImportError:
            return ""  # no engine: the run itself says so
        except errors().SynomalyError as exc:
            return str(exc)
        if not checkpoint.is_file():
            return (f"No cancelled run of '{parameters.model_name}' to resume (no checkpoint in {checkpoint.parent}); "
                    "click Start training.")
        return ""

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
        of the same name. Runs in a worker process and blocks until done; a ``cancel()`` that returns
        True stops it with a checkpoint kept for ``resume``.
        """
        request = self.prepare_training(healthy, name, preset, steps, device, resume, **settings)
        return self.start_training_job(request, progress).wait(cancel=cancel)

    def start_training(self, parameters: Parameters, resume: bool = False,
                       on_progress: Optional[Callable] = None, **settings) -> WorkerJob:
        """Training in a worker process from the panel's settings, drawing the loss into a plot.

        ``on_progress(step, total, loss, message)`` runs on the polling thread, after the plot is updated;
        ``settings``: further TrainingSettings values (as for ``train``).
        """
        request = self.prepare_training(parameters.training_source(), parameters.model_name, parameters.preset,
                                        parameters.steps, parameters.training_device, resume, **settings)
        curve = LossCurve(self.scene, parameters.loss_table)
        if not resume:
            curve.clear()
        self.loss_curve = curve
        self._remember_loss_table()

        def progress(step, total, loss, message):
            self._live_loss_curve().add(step, loss)
            if on_progress is not None:
                on_progress(step, total, loss, message)

        return self.start_training_job(request, progress, after_progress=lambda: self._live_loss_curve().flush())

    def _remember_loss_table(self) -> None:
        stored = self.parameters()
        stored.loss_table = self.loss_curve.table
        self.save_parameters(stored)

    def _live_loss_curve(self) -> LossCurve:
        """The plot in the current scene: a run goes on when the scene is closed, and draws into a new one."""
        if self.loss_curve.table.GetScene() is not self.scene:
            self.loss_curve = LossCurve(self.scene)
            self._remember_loss_table()
        return self.loss_curve


def _write_job_volume(path: Path, array, geometry) -> None:
    """A job volume, or an OutputError that says where and what to do (a full disk, a read-only folder)."""
    try:
        write_nrrd(path, array, geometry)
    except OSError as exc:
        raise errors().OutputError(f"The job file {path.name} could not be written in {path.parent.parent} "
                                   f"({exc.strerror or exc}); free some disk space, or choose another temporary "
                                   "folder in Slicer's Application Settings (General).") from None


def read_detection_result(result: dict):
    """The worker's output files as the engine's DetectionResult (arrays on the input's grid), read
    without SimpleITK: nothing redirects Slicer's stderr meanwhile."""
    arrays = {kind: read_nrrd_array(path) for kind, path in result["outputs"].items()}
    return engine_module("inference.detection").DetectionResult(
        arrays["anomaly_map"], arrays["segmentation"], arrays["counterfactual"], arrays.get("uncertainty"),
        result.get("report") or {})


def format_report(report: Optional[dict]) -> str:
    """The panel's summary of a detection report."""
    if not report:
        return ""
    components = report.get("components") or []
    n = report.get("n_components", len(components))
    if "anomalous_area_px" in report:  # a 2D image: areas, in mm^2 where its pixel spacing is known
        mm2 = report.get("pixel_spacing_known") and report.get("anomalous_area_mm2") is not None
        scale = report["anomalous_area_mm2"] / max(report["anomalous_area_px"], 1) if mm2 else 1.0
        unit, digits = ("mm^2", 1) if mm2 else ("pixels", 0)
        lines = [f"Anomalous area: {report['anomalous_area_px'] * scale:.{digits}f} {unit} in {n} component(s)"]
        sizes = [f"{int(c.get('voxels', 0)) * scale:.{digits}f} {unit}" for c in components[:5]]
    else:
        lines = [f"Anomalous volume: {report.get('anomalous_volume_ml', 0.0):.2f} mL in {n} component(s)"]
        sizes = [f"{float(c.get('volume_ml', 0.0)):.2f} mL" for c in components[:5]]
    for index, size in enumerate(sizes, start=1):
        lines.append(f"  #{index}: {size}")
    if len(components) > 5:
        lines.append(f"  ... and {len(components) - 5} more")
    if "max_score" in report:
        lines.append(f"Max score: {report['max_score']:.3f}, mean score: {report.get('mean_score', 0.0):.3f}")
    if "threshold" in report:
        lines.append(f"Threshold: {report['threshold']:.3f} ({report.get('threshold_source', 'model')})")
    fit = report.get("input_fit") or {}
    if fit.get("score") is not None:
        lines.append(f"Input fit: {fit['verdict']} (score {fit['score']:.1f}; 0: like the model's calibration volumes)")
    model = report.get("model") or {}
    if model:
        lines.append(f"Model: {model.get('name', '')} ({model.get('model_id', '')})")
    # Warnings first: an unusual input or a geometry note must be read before the volume.
    return "\n".join([f"Warning: {panel_wording(w)}" for w in report.get("warnings") or []] + lines)
