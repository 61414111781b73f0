"""The module's settings as a dataclass, stored in the scene's parameter node.

Values go into the node as string parameters and node references, which the scene writes to and reads
from its .mrml file: the settings and the last outputs survive a scene save and reload.
"""
import json
from dataclasses import dataclass, field, fields
from typing import List, Optional

import slicer

MODULE_NAME = "SynomalyDetection"


def _scalar(key):
    return {"key": key}


def _ref(role):
    return {"ref": role}


def _refs(role):
    return {"refs": role}


@dataclass
class Parameters:
    """Detection and training settings; 0 in stages, noise level, threshold and ensemble means the model's default."""

    input_volume: Optional[object] = field(default=None, metadata=_ref("InputVolume"))
    several_inputs: bool = field(default=False, metadata=_scalar("SeveralInputs"))
    input_volumes: List[object] = field(default_factory=list, metadata=_refs("InputVolumes"))
    mask: Optional[object] = field(default=None, metadata=_ref("Mask"))
    model: str = field(default="", metadata=_scalar("Model"))
    device: str = field(default="auto", metadata=_scalar("Device"))
    stages: int = field(default=0, metadata=_scalar("Stages"))
    noise_level: int = field(default=0, metadata=_scalar("NoiseLevel"))
    threshold: float = field(default=0.0, metadata=_scalar("Threshold"))
    ensemble: int = field(default=0, metadata=_scalar("Ensemble"))
    update_outputs: bool = field(default=True, metadata=_scalar("UpdateOutputs"))
    segmentation: Optional[object] = field(default=None, metadata=_ref("AnomalySegmentation"))
    counterfactual: Optional[object] = field(default=None, metadata=_ref("Counterfactual"))
    anomaly_map: Optional[object] = field(default=None, metadata=_ref("AnomalyMap"))
    uncertainty: Optional[object] = field(default=None, metadata=_ref("Uncertainty"))
    last_report: str = field(default="", metadata=_scalar("LastReport"))
    training_from_folder: bool = field(default=True, metadata=_scalar("TrainingFromFolder"))
    training_folder: str = field(default="", metadata=_scalar("TrainingFolder"))
    training_volumes: List[object] = field(default_factory=list, metadata=_refs("TrainingVolume"))
    preset: str = field(default="brain-flair", metadata=_scalar("Preset"))
    steps: int = field(default=0, metadata=_scalar("Steps"))
    training_device: str = field(default="auto", metadata=_scalar("TrainingDevice"))
    model_name: str = field(default="my-model", metadata=_scalar("ModelName"))
    loss_table: Optional[object] = field(default=None, metadata=_ref("LossTable"))

    def detection_settings(self) -> dict:
        """The engine's detection settings; None lets the model decide."""
        return {"device": self.device, "stages": self.stages or None, "noise_level": self.noise_level or None,
                "threshold": self.threshold or None, "ensemble": self.ensemble or None}

    @property
    def chosen_folder(self) -> str:
        """The training folder, "" when none was chosen: an empty path, or "." (what a ctkDirectoryButton
        holds before a folder is picked, while it shows Slicer's working directory)."""
        return self.training_folder if self.training_folder.strip() not in ("", ".") else ""

    def training_source(self):
        """What the panel trains on: the chosen folder, or the checked volumes."""
        if self.training_from_folder:
            return self.chosen_folder or []
        return list(self.training_volumes)

    def report(self) -> Optional[dict]:
        return json.loads(self.last_report) if self.last_report else None

    @classmethod
    def from_node(cls, node) -> "Parameters":
        values = {}
        names = set(node.GetParameterNames())
        for f in fields(cls):
            meta = f.metadata
            if "ref" in meta:
                values[f.name] = node.GetNodeReference(meta["ref"])
            elif "refs" in meta:
                nodes = [node.GetNthNodeReference(meta["refs"], i)
                         for i in range(node.GetNumberOfNodeReferences(meta["refs"]))]
                values[f.name] = [n for n in nodes if n is not None]
            elif meta["key"] in names:
                values[f.name] = _parse(node.GetParameter(meta["key"]), f.default)
        return cls(**values)

    def to_node(self, node) -> None:
        """Write all values at once: one Modified event for observers such as the widget."""
        was_modifying = node.StartModify()
        try:
            for f in fields(self):
                meta, value = f.metadata, getattr(self, f.name)
                if "ref" in meta:
                    node.SetNodeReferenceID(meta["ref"], value.GetID() if value is not None else None)
                elif "refs" in meta:
                    node.RemoveNodeReferenceIDs(meta["refs"])
                    for item in value:
                        node.AddNodeReferenceID(meta["refs"], item.GetID())
                else:
                    node.SetParameter(meta["key"], _format(value))
        finally:
            node.EndModify(was_modifying)


def _parse(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(float(text)) if text else default
    if isinstance(default, float):
        return float(text) if text else default
    return text


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def get_parameter_node(scene=None, create: bool = True):
    """The module's singleton parameter node, as ScriptedLoadableModuleLogic.getParameterNode finds it."""
    scene = scene or slicer.mrmlScene
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    elif node is not None and node.GetAttribute("ModuleName") != MODULE_NAME:
        node.SetAttribute("ModuleName", MODULE_NAME)
    return node
