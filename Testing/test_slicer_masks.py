"""Masks, output geometry, terminology and what the panel's selectors offer (issue 20: items 3, 7, 11, 13),
on real MRML nodes (slicer-core)."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import vtk

from test_slicer_detection import SHAPE, StandInModels, lesion_volume, run_here, segment_array
from test_slicer_scene import MODULE_DIR, add_volume, new_scene, node_ids, slicer

from SynomalyDetectionLib import MrmlBridge, SynomalyLogic
from synomaly.errors import InputError

UI_FILE = MODULE_DIR / "Resources" / "UI" / "SynomalyDetection.ui"


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def logic(tmp_path):
    return SynomalyLogic(engine=StandInModels(), user_models_dir=tmp_path / "models")


def shift_transform(scene, x=5.0):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, x)
    transform.SetMatrixTransformToParent(matrix)
    return transform


def sphere_segmentation(scene, center, radius, name="imported surface"):
    """A segmentation holding only a closed surface, as an imported STL/OBJ model gives."""
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*center)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName())
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "region", (0.2, 0.6, 0.2))
    return node


# 7. masks


def test_a_closed_surface_only_segmentation_is_a_mask_and_is_left_as_it_was(scene, logic):
    node = add_volume(lesion_volume(), name="flair")  # identity grid: voxel (k, j, i) is at (i, j, k) mm
    mask_node = sphere_segmentation(scene, center=(24.0, 24.0, 6.0), radius=5.0)
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    assert not mask_node.GetSegmentation().ContainsRepresentation(labelmap)
    mask = logic.prepare_detection(node, maskNode=mask_node).mask
    k, j, i = np.nonzero(mask)
    assert 250 < mask.sum() < 700, "about the sphere's 524 mm^3"
    assert abs(i.mean() - 24) < 1 and abs(j.mean() - 24) < 1 and abs(k.mean() - 6) < 1
    assert not mask_node.GetSegmentation().ContainsRepresentation(labelmap), "the user's node is not converted"


def test_a_closed_surface_mask_under_a_transform_is_taken_where_it_is_shown(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    mask_node = sphere_segmentation(scene, center=(20.0, 24.0, 6.0), radius=4.0)
    mask_node.SetAndObserveTransformNodeID(shift_transform(scene).GetID())
    k, j, i = np.nonzero(logic.prepare_detection(node, maskNode=mask_node).mask)
    assert abs(i.mean() - 25) < 1, "5 mm to the right of the surface's own coordinates"


@pytest.mark.parametrize("moved", [False, True])
def test_a_segmentation_of_empty_segments_is_a_clear_error(scene, logic, moved):
    node = add_volume(lesion_volume(), name="flair")
    mask_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn nothing")
    mask_node.SetReferenceImageGeometryParameterFromVolumeNode(node)
    mask_node.GetSegmentation().AddEmptySegment("brain")
    if moved:
        mask_node.SetAndObserveTransformNodeID(shift_transform(scene).GetID())
    before = node_ids(scene)
    with pytest.raises(InputError, match="'drawn nothing' is empty"):
        logic.prepare_detection(node, maskNode=mask_node)
    assert node_ids(scene) == before


# 11. the anomaly segmentation of a transformed input lies on the input's grid


def test_the_segmentation_of_a_transformed_input_keeps_the_inputs_grid_as_reference(scene, logic):
    node = add_volume(lesion_volume(), name="moved")
    node.SetAndObserveTransformNodeID(shift_transform(scene, 12.0).GetID())
    outputs = run_here(logic, node)
    geometry = outputs.segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    stored = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(stored, MrmlBridge.ijk_to_ras(node)), "in the segmentation's own frame, not moved twice"
    assert outputs.segmentation.GetTransformNodeID() == node.GetTransformNodeID()
    assert np.array_equal(segment_array(outputs.segmentation, node) > 0, lesion_volume() > 0.8)


# terminology


def test_the_anomaly_segment_carries_a_standard_terminology(scene, logic):
    outputs = run_here(logic, add_volume(lesion_volume(), name="flair"))
    segmentation = outputs.segmentation.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Anomaly"))
    entry = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    fields = str(entry).split("~")
    assert len(fields) == 7, "Slicer's serialized terminology entry: context, category, type, modifier, ..."
    assert fields[1] == "SCT^49755003^Morphologically Altered Structure" and fields[2] == "SCT^52988006^Lesion"


# 3 and 13: what the selectors offer


def selector(name):
    widget = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == name)
    props = {p.get("name"): p for p in widget.findall("property")}
    types = [s.text for s in props["nodeTypes"].iter("string")]
    show_children = props["showChildNodeTypes"].findtext("bool") == "true" if "showChildNodeTypes" in props else True
    hidden = [s.text for s in props["hideChildNodeTypes"].iter("string")] if "hideChildNodeTypes" in props else []
    return types, show_children, hidden


def offered(name, node):
    """What qMRMLNodeComboBox shows for that .ui setup (qMRMLSortFilterProxyModel's class filter)."""
    types, show_children, hidden = selector(name)
    exact = node.GetClassName() in types
    child = show_children and any(node.IsA(t) for t in types) and not any(node.IsA(h) for h in hidden)
    return exact or child


@pytest.mark.parametrize("name", ["inputVolumeSelector", "trainingVolumesSelector"])
def test_colour_images_are_offered_and_label_maps_and_diffusion_volumes_are_not(scene, name):
    assert offered(name, slicer.vtkMRMLScalarVolumeNode())
    assert offered(name, slicer.vtkMRMLVectorVolumeNode()), "how Slicer loads an RGB PNG, JPEG or ultrasound"
    for cls in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"):
        assert not offered(name, getattr(slicer, cls)()), cls
    assert set(selector(name)[2]) == set(MrmlBridge.NOT_INPUT_TYPES)


def test_detection_outputs_are_not_offered_as_inputs(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    label = add_volume(np.zeros(SHAPE, np.uint8), name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    outputs = run_here(logic, node)
    assert sorted(MrmlBridge.output_node_ids(scene)) == sorted(n.GetID() for n in outputs.nodes())
    assert MrmlBridge.is_input_candidate(node) and not MrmlBridge.is_input_candidate(label)
    assert not any(MrmlBridge.is_input_candidate(n) for n in outputs.nodes())
    scene.RemoveNode(node)
    assert MrmlBridge.default_input_volume(scene) is None, "neither a label map nor an output is a default input"


def test_the_layout_is_kept_when_it_shows_the_red_and_yellow_views(scene):
    """Views outlive a layout change in Slicer; only their mapped flag says whether the layout shows them."""
    views = {}
    for name in ("Red", "Yellow", "Green"):
        views[name] = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        views[name].SetLayoutName(name)
    assert not MrmlBridge.shown_in_layout(scene), "no layout shown yet"
    for name in ("Red", "Yellow", "Green"):
        views[name].SetMappedInLayout(1)
    assert MrmlBridge.shown_in_layout(scene), "the conventional layout: keep it"
    views["Yellow"].SetMappedInLayout(0)
    assert not MrmlBridge.shown_in_layout(scene), "Red only: switch to side by side"
