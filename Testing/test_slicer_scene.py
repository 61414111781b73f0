"""Real MRML from slicer-core: the scene set-up the other test_slicer_* files share, the geometry round
trip between volume nodes and the engine, subject-hierarchy placement and the parameter node."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core) for real MRML")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SynomalyDetection"
sys.path.insert(0, str(MODULE_DIR))

from SynomalyDetectionLib import MrmlBridge, Parameters, SynomalyLogic, get_parameter_node  # noqa: E402
from SynomalyDetectionLib.Engine import Engine, ensure_engine_importable  # noqa: E402

ensure_engine_importable()


class _ModuleLogic:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def new_scene():
    """A scene wired as the Slicer application wires it: colours, volumes, segmentations, subject hierarchy."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for key, cls in (("colors", slicer.vtkSlicerColorLogic), ("volumes", slicer.vtkSlicerVolumesLogic),
                     ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                     ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(key.capitalize(), logic)
        logics[key] = _ModuleLogic(logic)
    slicer.modules = types.SimpleNamespace(**logics)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    scene._keep_alive = app_logic
    return scene


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def oblique_matrix(spacing=(0.8, 1.1, 2.5), origin=(-40.0, 25.0, 13.0), angles=(0.3, -0.2, 0.5)):
    """IJK-to-RAS of a rotated (oblique) grid with anisotropic voxels."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def add_volume(array, matrix=None, name="case", class_name="vtkMRMLScalarVolumeNode"):
    node = slicer.util.addVolumeFromArray(array, matrix if matrix is not None else np.eye(4), name=name,
                                          nodeClassName=class_name)
    return node


def add_segmentation(volume_node, segments, name="segmentation"):
    """A segmentation made on ``volume_node`` (its source volume), one segment per (name, boolean array on
    the volume's grid)."""
    node = volume_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for segment, array in segments:
        segment_id = node.GetSegmentation().AddEmptySegment(segment, segment)
        slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), node, segment_id, volume_node)
    return node


@pytest.fixture
def scene():
    return new_scene()


def test_geometry_round_trip_for_an_oblique_anisotropic_volume(scene):
    matrix = oblique_matrix()
    node = add_volume(np.zeros((5, 6, 7), np.float32), matrix)
    geometry = Engine().geometry_from_ijk_to_ras(MrmlBridge.ijk_to_ras(node))
    assert np.allclose(geometry.spacing, (0.8, 1.1, 2.5))
    assert np.allclose(geometry.ijk_to_ras(), matrix, atol=1e-9)
    # LPS convention: the first two origin coordinates flip sign
    assert np.allclose(geometry.origin, (40.0, -25.0, 13.0))
    back = add_volume(np.zeros((5, 6, 7), np.float32), geometry.ijk_to_ras(), name="back")
    assert np.allclose(MrmlBridge.ijk_to_ras(back), matrix, atol=1e-9)


def test_volume_to_array_is_a_zyx_copy(scene):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    node = add_volume(data, oblique_matrix())
    copy = MrmlBridge.volume_to_array(node)
    assert copy.shape == (5, 6, 7) and np.array_equal(copy, data)
    copy[:] = 0
    assert np.array_equal(slicer.util.arrayFromVolume(node), data)


def test_outputs_go_beside_the_input_in_the_subject_hierarchy(scene):
    sh = MrmlBridge.subject_hierarchy(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MR 2024")
    node = add_volume(np.zeros((3, 4, 5), np.float32))
    sh.CreateItem(study, node)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    MrmlBridge.place_beside(other, node)
    assert sh.GetItemParent(sh.GetItemByDataNode(other)) == study


def test_parameter_node_survives_scene_save_and_reload(scene, tmp_path):
    volume = add_volume(np.ones((4, 5, 6), np.float32), oblique_matrix(), name="flair")
    mask = add_volume(np.ones((4, 5, 6), np.uint8), oblique_matrix(), name="brain",
                      class_name="vtkMRMLLabelMapVolumeNode")
    for node, file_name in ((volume, "flair.nrrd"), (mask, "brain.nrrd")):
        storage = node.CreateDefaultStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(tmp_path / file_name))
        node.SetAndObserveStorageNodeID(storage.GetID())
        assert storage.WriteData(node)
    params = Parameters(input_volume=volume, mask=mask, model="/models/site-a.safetensors", device="cpu",
                        stages=4, noise_level=250, threshold=0.125, ensemble=3, update_outputs=False,
                        last_report='{"anomalous_volume_ml": 1.5}', training_from_folder=False,
                        training_folder="/data/healthy", training_volumes=[volume, mask], preset="liver-ct",
                        steps=500, training_device="cuda", model_name="site-a", several_inputs=True,
                        input_volumes=[volume])
    params.to_node(get_parameter_node(scene))
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reloaded = new_scene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    restored = Parameters.from_node(get_parameter_node(reloaded, create=False))
    assert restored.input_volume.GetName() == "flair" and restored.mask.GetName() == "brain"
    assert np.allclose(MrmlBridge.ijk_to_ras(restored.input_volume), oblique_matrix())
    assert [n.GetName() for n in restored.training_volumes] == ["flair", "brain"]
    assert [n.GetName() for n in restored.input_volumes] == ["flair"]
    for name in ("several_inputs", "model", "device", "stages", "noise_level", "threshold", "ensemble", "update_outputs",
                 "last_report", "training_from_folder", "training_folder", "preset", "steps",
                 "training_device", "model_name"):
        assert getattr(restored, name) == getattr(params, name), name
    assert restored.report() == {"anomalous_volume_ml": 1.5}


def test_defaults_come_back_from_an_empty_parameter_node(scene):
    assert Parameters.from_node(get_parameter_node(scene)) == Parameters()
    assert get_parameter_node(scene) is get_parameter_node(scene)


def test_logic_parameters_round_trip(scene):
    logic = SynomalyLogic(user_models_dir=Path("/nonexistent"))
    params = logic.parameters()
    params.stages, params.threshold = 2, 0.3
    logic.save_parameters(params)
    assert logic.parameters().detection_settings() == {
        "device": "auto", "stages": 2, "noise_level": None, "threshold": 0.3, "ensemble": None}
