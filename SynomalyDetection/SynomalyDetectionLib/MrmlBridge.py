"""Between MRML nodes and the engine's numpy arrays; runs on the main thread only.

Inputs are copied out of the nodes (the engine never sees, nor changes, a node's memory); outputs get
the input's IJK-to-RAS matrix and parent transform, so they overlay the input exactly.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .Engine import errors

ANOMALY_SEGMENT_NAME = "Anomaly"
ANOMALY_COLOR = (0.9, 0.1, 0.1)
ANOMALY_MAP_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
INPUT_ATTRIBUTE = "SynomalyDetection.InputVolume"


@dataclass
class OutputNodes:
    """The three nodes a detection writes, and the engine's report of that run."""

    segmentation: object
    counterfactual: object
    anomaly_map: object
    report: Optional[dict] = None

    def nodes(self) -> List[object]:
        return [self.segmentation, self.counterfactual, self.anomaly_map]


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def check_input_volume(node) -> None:
    """Raise the engine's InputError, with what to do, for anything but a 3D single-channel scalar volume."""
    InputError = errors().InputError
    if node is None:
        raise InputError("No input volume: select a scalar volume (for example a FLAIR MRI).")
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{name}' is a label map; select an intensity image. "
                         "A label map can serve as the mask.")
    if node.IsA("vtkMRMLTensorVolumeNode") or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{name}' is a {node.GetClassName()} (vector, RGB or tensor image); "
                         "select a single-channel scalar volume.")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"'{name}' holds no image data.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
                         "select a single-channel scalar volume.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"'{name}' is a 2D image ({dims[0]} x {dims[1]} x {dims[2]} voxels); "
                         "detection needs a 3D volume.")


def check_mask(node) -> None:
    if node is None:
        return
    if not (node.IsA("vtkMRMLSegmentationNode") or node.IsA("vtkMRMLLabelMapVolumeNode")):
        raise errors().InputError(f"The mask '{node.GetName()}' is a {node.GetClassName()}; "
                                  "use a segmentation or a label map.")


def array_shape(volume_node):
    """(z, y, x) voxel counts."""
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


def volume_to_array(volume_node) -> np.ndarray:
    """A copy of the voxels, (z, y, x)."""
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    return numpy_support.vtk_to_numpy(scalars).reshape(array_shape(volume_node)).copy()


def _geometry_image(volume_node):
    """An oriented image with the volume's grid and no voxels: a resampling target."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    return image


def _oriented_image_to_array(image, shape) -> np.ndarray:
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return array.reshape(shape).copy()


def mask_to_array(mask_node, reference_volume) -> Optional[np.ndarray]:
    """The mask as a boolean (z, y, x) array on the reference volume's grid; None without a mask."""
    if mask_node is None:
        return None
    shape = array_shape(reference_volume)
    target = _geometry_image(reference_volume)
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        merged = slicer.vtkOrientedImageData()
        if not mask_node.GenerateMergedLabelmapForAllSegments(
                merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, target):
            raise errors().InputError(f"The mask '{mask_node.GetName()}' has no segments to use.")
        labels = _oriented_image_to_array(merged, shape)
    else:
        same_grid = (mask_node.GetImageData() is not None
                     and array_shape(mask_node) == shape
                     and np.allclose(ijk_to_ras(mask_node), ijk_to_ras(reference_volume), atol=1e-6))
        if same_grid:
            labels = volume_to_array(mask_node)
        else:
            source = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(mask_node)
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                source, target, resampled, False)
            labels = _oriented_image_to_array(resampled, shape)
    mask = labels > 0
    if not mask.any():
        raise errors().InputError(f"The mask '{mask_node.GetName()}' is empty on the input volume's grid; "
                                  "draw the region to analyse, or run without a mask.")
    return mask


def subject_hierarchy(scene=None):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene or slicer.mrmlScene)


def _sh_item(sh, node) -> int:
    """The node's item; created here because outside the Slicer application nothing creates it."""
    return sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node)


def place_beside(node, reference) -> None:
    """Put ``node`` under the same subject-hierarchy parent (patient, study or folder) as ``reference``."""
    sh = subject_hierarchy(node.GetScene())
    parent = sh.GetItemParent(_sh_item(sh, reference))
    sh.SetItemParent(_sh_item(sh, node), parent)


def _is_output_of(node, input_node) -> bool:
    return (node is not None and node.GetScene() is not None
            and node.GetAttribute(INPUT_ATTRIBUTE) == input_node.GetID())


def reusable_outputs(input_node, segmentation, counterfactual, anomaly_map) -> Optional[OutputNodes]:
    """Earlier outputs to overwrite: only when all three still exist and came from this input."""
    candidates = OutputNodes(segmentation, counterfactual, anomaly_map)
    if all(_is_output_of(n, input_node) for n in candidates.nodes()):
        return candidates
    return None


def _check_result_shapes(result, shape) -> None:
    arrays = {"anomaly map": result.anomaly_map, "segmentation": result.segmentation,
              "counterfactual": result.counterfactual}
    for label, array in arrays.items():
        if array is None or tuple(array.shape) != tuple(shape):
            got = None if array is None else tuple(array.shape)
            raise RuntimeError(f"The engine returned a {label} of shape {got} for an input of shape {shape}.")


def _binary_labelmap(array, ijk_to_ras_matrix):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(tuple(reversed(array.shape)))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (array > 0).ravel().astype(np.uint8)
    image.SetImageToWorldMatrix(ijk_to_ras_matrix)
    return image


def _write_scalar_volume(node, array, input_node) -> None:
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(input_node)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()


def _write_segmentation(node, array, input_node) -> None:
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(ANOMALY_SEGMENT_NAME)
    if not segment_id:
        segment_id = segmentation.AddEmptySegment(ANOMALY_SEGMENT_NAME, ANOMALY_SEGMENT_NAME, ANOMALY_COLOR)
    labelmap = _binary_labelmap(array, _vtk_matrix(ijk_to_ras(input_node)))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id):
        raise RuntimeError(f"Could not write the segment '{ANOMALY_SEGMENT_NAME}' into '{node.GetName()}'.")


def _display_like_input(counterfactual, input_node) -> None:
    source, target = input_node.GetDisplayNode(), counterfactual.GetDisplayNode()
    if source is None or target is None:
        return
    target.SetAndObserveColorNodeID(source.GetColorNodeID())
    target.AutoWindowLevelOff()
    target.SetWindowLevel(source.GetWindow(), source.GetLevel())


def _display_anomaly_map(node, array) -> None:
    display = node.GetDisplayNode()
    if display is None:
        return
    if node.GetScene().GetNodeByID(ANOMALY_MAP_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(ANOMALY_MAP_COLOR_NODE_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, max(float(np.max(array)), 1e-6))


def write_outputs(input_node, result, reuse: Optional[OutputNodes] = None) -> OutputNodes:
    """Create (or overwrite ``reuse``) the three output nodes; on failure remove whatever was created."""
    scene = input_node.GetScene()
    _check_result_shapes(result, array_shape(input_node))
    name = input_node.GetName()
    created = []

    def node_for(existing, class_name, suffix):
        if existing is not None:
            existing.SetName(f"{name} {suffix}")
            return existing
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(f"{name} {suffix}"))
        created.append(node)
        return node

    try:
        outputs = OutputNodes(
            node_for(reuse and reuse.segmentation, "vtkMRMLSegmentationNode", "anomalies"),
            node_for(reuse and reuse.counterfactual, "vtkMRMLScalarVolumeNode", "counterfactual"),
            node_for(reuse and reuse.anomaly_map, "vtkMRMLScalarVolumeNode", "anomaly map"),
            result.report)
        _write_segmentation(outputs.segmentation, result.segmentation, input_node)
        _write_scalar_volume(outputs.counterfactual, result.counterfactual, input_node)
        _display_like_input(outputs.counterfactual, input_node)
        _write_scalar_volume(outputs.anomaly_map, result.anomaly_map, input_node)
        _display_anomaly_map(outputs.anomaly_map, result.anomaly_map)
        for node in outputs.nodes():
            node.SetAttribute(INPUT_ATTRIBUTE, input_node.GetID())
            place_beside(node, input_node)
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        raise
    return outputs
