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

from .Engine import engine_module, errors

ANOMALY_SEGMENT_NAME = "Anomaly"
ANOMALY_COLOR = (0.9, 0.1, 0.1)
ANOMALY_MAP_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
MAP_DISPLAY_FLOOR = 1e-6  # the anomaly map is coloured from here (or half the threshold) up: zero stays clear
INPUT_ATTRIBUTE = "SynomalyDetection.InputVolume"
OUTPUT_ATTRIBUTE = "SynomalyDetection.Output"  # which output a node is: an OutputNodes field name
# The Anomaly segment's standard terminology (SNOMED CT "Lesion" under "Morphologically Altered Structure"),
# serialized as Slicer's terminology logic does: a DICOM SEG export then codes it, instead of leaving it
# with Slicer's generic default.
ANOMALY_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
                       "Structure~SCT^52988006^Lesion~^^~Anatomic codes - DICOM master list~^^~^^")
# Volume classes that derive from vtkMRMLScalarVolumeNode but are not images to analyse (the panel's
# selectors hide them; colour images, vtkMRMLVectorVolumeNode, stay)
NOT_INPUT_TYPES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                   "vtkMRMLDiffusionTensorVolumeNode")


@dataclass
class OutputNodes:
    """The nodes a detection writes (the uncertainty map only for an ensemble), the engine's report of
    that run and the input it analysed."""

    segmentation: object
    counterfactual: object
    anomaly_map: object
    report: Optional[dict] = None
    uncertainty: Optional[object] = None
    input_node: Optional[object] = None

    def nodes(self) -> List[object]:
        return [self.segmentation, self.counterfactual, self.anomaly_map] + (
            [self.uncertainty] if self.uncertainty is not None else [])


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


def is_2d(node) -> bool:
    """A volume of one slice: a 2D image (a PNG or JPEG loads so)."""
    return min(node.GetImageData().GetDimensions()) == 1


def check_input_volume(node) -> None:
    """Raise the engine's InputError, with what to do, for anything but a single-channel scalar volume, or a
    2D image (one slice), which may be colour (RGB(A) is taken as grey). Whether the model takes 2D
    images is ``check_dimensions``'s question."""
    InputError = errors().InputError
    if node is None:
        raise InputError("No input volume: select a scalar volume (for example a FLAIR MRI).")
    name = node.GetName()
    if node.GetScene() is None:  # removed meanwhile (while a batch ran): its outputs would have no scene
        raise InputError(f"The input volume '{name}' was removed from the scene; nothing was added for it.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{name}' is a label map; select an intensity image. "
                         "A label map can serve as the mask.")
    vector = node.IsA("vtkMRMLVectorVolumeNode")  # a colour image: a kind of tensor volume node in MRML
    if (node.IsA("vtkMRMLTensorVolumeNode") and not vector) or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{name}' is a {node.GetClassName()} (vector, RGB or tensor image); "
                         "select a single-channel scalar volume.")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"'{name}' holds no image data.")
    components = image.GetNumberOfScalarComponents()
    if components != 1 and not (is_2d(node) and components in (2, 3, 4)):
        raise InputError(f"'{name}' has {components} components per voxel (a vector or RGB volume); select a "
                         "single-channel scalar volume. Only a 2D image (one slice) may be colour: it is taken "
                         "as grey.")


def check_dimensions(node, preset) -> None:
    """A 2D image only for a model of a 2D preset (carotid-us); ``preset``: the model's preset name, None
    when unknown (taken as 3D). The message says why, as the engine's does."""
    if not is_2d(node):
        return
    presets = engine_module("method.presets")
    if preset in presets.PRESETS and presets.PRESETS[preset].two_d:
        return
    size = [n for n in node.GetImageData().GetDimensions() if n != 1]
    raise errors().InputError(presets.two_d_refusal(preset, f"'{node.GetName()}'", size))


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
    """A copy of the voxels, (z, y, x); a colour 2D image as grey, as the engine reads one from a file."""
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars)
    if array.ndim == 2 and array.shape[1] > 1:
        array = engine_module("files.volume_io").rgb_to_grey(array, f"The image '{volume_node.GetName()}'")[0]
    return array.reshape(array_shape(volume_node)).copy()


def _geometry_image(volume_node):
    """An oriented image with the volume's grid and no voxels: a resampling target."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    return image


def _oriented_image_to_array(image, shape) -> np.ndarray:
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return array.reshape(shape).copy()


def _same_frame(node, reference) -> bool:
    return (node.GetTransformNodeID() or None) == (reference.GetTransformNodeID() or None)


def _move_to_frame_of(image, node, reference) -> None:
    """Move ``image``, in ``node``'s coordinate frame (under its parent transform), into ``reference``'s."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(),
                                                         reference.GetParentTransformNode(), transform)
    slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, transform)


def _resampled(image, target, shape) -> np.ndarray:
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, target, resampled, False)
    return _oriented_image_to_array(resampled, shape)


def segments_named(segmentation, name: str) -> List[str]:
    """The IDs of the segments called ``name``, in any case and with spaces around it ignored."""
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [i for i in ids if segmentation.GetSegment(i).GetName().strip().lower() == name.lower()]


def organ_segments(mask_node, organ: str) -> Optional[List[str]]:
    """The IDs of the segments named ``organ`` (any case) when the segmentation has several, so that a
    whole-body segmentation (TotalSegmentator's) gives its liver; None: use every segment."""
    segmentation = mask_node.GetSegmentation()
    count = segmentation.GetNumberOfSegments()
    if not organ or count <= 1:
        return None
    named = segments_named(segmentation, organ)
    if not named:
        raise errors().InputError(f"The mask '{mask_node.GetName()}' has {count} segments and none is named "
                                  f"'{organ}'; the model needs the {organ} alone: rename the {organ} segment to "
                                  f"'{organ}', or pick a segmentation that holds only the {organ}.")
    return named


def _with_binary_labelmap(mask_node, target, same_frame: bool):
    """``mask_node`` itself when it has binary labelmaps; else (imported closed surfaces) a copy outside
    the scene converted to them, on the input's grid where the frames agree: the user's node is not
    changed."""
    if mask_node.GetSegmentation().ContainsRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
        return mask_node
    copy = slicer.vtkMRMLSegmentationNode()
    copy.GetSegmentation().DeepCopy(mask_node.GetSegmentation())
    if same_frame:
        copy.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(target))
    if not copy.CreateBinaryLabelmapRepresentation():
        raise errors().InputError(f"The mask '{mask_node.GetName()}' cannot be converted to a binary labelmap; "
                                  "convert it in the Segmentations module, or pick another mask.")
    return copy


def _segmentation_labels(mask_node, reference_volume, target, shape, segment_ids=None) -> np.ndarray:
    merged = slicer.vtkOrientedImageData()
    same_frame = _same_frame(mask_node, reference_volume)
    mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY if same_frame else slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS
    selected = None
    if segment_ids is not None:
        selected = vtk.vtkStringArray()
        for segment_id in segment_ids:
            selected.InsertNextValue(segment_id)
    source = _with_binary_labelmap(mask_node, target, same_frame)
    if not source.GenerateMergedLabelmapForAllSegments(merged, mode, target if same_frame else None, selected):
        raise errors().InputError(f"The mask '{mask_node.GetName()}' has no segments to use.")
    if merged.GetPointData().GetScalars() is None or merged.GetNumberOfPoints() == 0:
        raise errors().InputError(f"The mask '{mask_node.GetName()}' is empty: its segments hold no voxels; draw "
                                  "the region to analyse, or run without a mask.")
    if same_frame:
        return _oriented_image_to_array(merged, shape)
    _move_to_frame_of(merged, mask_node, reference_volume)
    return _resampled(merged, target, shape)


def _label_map_labels(mask_node, reference_volume, target, shape) -> np.ndarray:
    same_grid = (_same_frame(mask_node, reference_volume)
                 and mask_node.GetImageData() is not None
                 and array_shape(mask_node) == shape
                 and np.allclose(ijk_to_ras(mask_node), ijk_to_ras(reference_volume), atol=1e-6))
    if same_grid:
        return volume_to_array(mask_node)
    # A new reference (the caller owns it), already in the reference volume's coordinate frame.
    source = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        mask_node, reference_volume.GetParentTransformNode())
    try:
        return _resampled(source, target, shape)
    finally:
        source.UnRegister(None)


def mask_to_array(mask_node, reference_volume, organ: str = "") -> Optional[np.ndarray]:
    """The mask as a boolean (z, y, x) array on the reference volume's grid; None without a mask.
    A mask under another parent transform than the volume is taken where it is shown (transformed).
    ``organ`` (a model that needs an organ mask): of a segmentation with several segments, only the
    segment of that name (``organ_segments``)."""
    if mask_node is None:
        return None
    shape = array_shape(reference_volume)
    target = _geometry_image(reference_volume)
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        labels = _segmentation_labels(mask_node, reference_volume, target, shape, organ_segments(mask_node, organ))
    else:
        labels = _label_map_labels(mask_node, reference_volume, target, shape)
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


def training_mask_node(volume_node, role: str):
    """The segmentation made on ``volume_node`` that shows ``role`` (e.g. the liver): one whose source
    volume (reference geometry) is this volume, with a segment of that name or a single segment; never
    a detection's output. None when there is none; an InputError when several could be it."""
    scene = volume_node.GetScene()
    geometry_role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    named, single = [], []
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for node in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())):
        if node.GetNodeReference(geometry_role) is not volume_node or node.GetAttribute(INPUT_ATTRIBUTE):
            continue
        segmentation = node.GetSegmentation()
        if segments_named(segmentation, role):  # organ_segments picks the segment by the same rule
            named.append(node)
        elif segmentation.GetNumberOfSegments() == 1:
            single.append(node)
    found = named or single
    if len(found) > 1:
        raise errors().InputError(f"Several segmentations made on '{volume_node.GetName()}' could be its {role} mask "
                                  f"({', '.join(n.GetName() for n in found)}); keep one, or name the {role} segment "
                                  f"'{role}' in the one to use.")
    return found[0] if found else None


def place_beside(node, reference) -> None:
    """Put ``node`` under the same subject-hierarchy parent (patient, study or folder) as ``reference``."""
    sh = subject_hierarchy(node.GetScene())
    parent = sh.GetItemParent(_sh_item(sh, reference))
    sh.SetItemParent(_sh_item(sh, node), parent)


def output_node_ids(scene) -> List[str]:
    """The nodes a detection wrote: the panel's input, mask and training selectors hide them."""
    ids = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.GetAttribute(INPUT_ATTRIBUTE):
            ids.append(node.GetID())
    return ids


def is_input_candidate(node) -> bool:
    """What the panel's input selector offers: scalar volumes, colour images included, but no label map,
    diffusion volume or detection output."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode")
            and not any(node.IsA(cls) for cls in NOT_INPUT_TYPES) and not node.GetAttribute(INPUT_ATTRIBUTE))


def default_input_volume(scene):
    """The first volume the input selector offers, or None."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for node in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())):
        if is_input_candidate(node):
            return node
    return None


def latest_outputs(input_node) -> Optional[OutputNodes]:
    """The last outputs written for ``input_node`` (to replace them in a batch run), or None."""
    scene, found = input_node.GetScene(), {}
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.GetAttribute(INPUT_ATTRIBUTE) == input_node.GetID() and node.GetAttribute(OUTPUT_ATTRIBUTE):
            found[node.GetAttribute(OUTPUT_ATTRIBUTE)] = node  # scene order: the last one wins
    return reusable_outputs(input_node, found.get("segmentation"), found.get("counterfactual"),
                            found.get("anomaly_map"), found.get("uncertainty"))


def _is_output_of(node, input_node) -> bool:
    return (node is not None and node.GetScene() is not None
            and node.GetAttribute(INPUT_ATTRIBUTE) == input_node.GetID())


def reusable_outputs(input_node, segmentation, counterfactual, anomaly_map,
                     uncertainty=None) -> Optional[OutputNodes]:
    """Earlier outputs to overwrite: only when the three maps still exist and came from this input
    (an uncertainty map too, when there is one)."""
    candidates = OutputNodes(segmentation, counterfactual, anomaly_map)
    if not all(_is_output_of(n, input_node) for n in candidates.nodes()):
        return None
    if _is_output_of(uncertainty, input_node):
        candidates.uncertainty = uncertainty
    return candidates


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
    """The parent transform first: the reference geometry is stored in the segmentation's own frame, so
    the other order would store a transformed input's grid transformed once more."""
    node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(ANOMALY_SEGMENT_NAME)
    if not segment_id:
        segment_id = segmentation.AddEmptySegment(ANOMALY_SEGMENT_NAME, ANOMALY_SEGMENT_NAME, ANOMALY_COLOR)
    segmentation.GetSegment(segment_id).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), ANOMALY_TERMINOLOGY)
    labelmap = _binary_labelmap(array, _vtk_matrix(ijk_to_ras(input_node)))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id):
        raise RuntimeError(f"Could not write the segment '{ANOMALY_SEGMENT_NAME}' into '{node.GetName()}'.")


def _display_like_input(counterfactual, input_node) -> None:
    source, target = input_node.GetDisplayNode(), counterfactual.GetDisplayNode()
    if source is None or target is None or input_node.IsA("vtkMRMLVectorVolumeNode"):
        return  # a colour image has no grey window and colour table to copy: the automatic window stays
    target.SetAndObserveColorNodeID(source.GetColorNodeID())
    target.AutoWindowLevelOff()
    target.SetWindowLevel(source.GetWindow(), source.GetLevel())


def _display_anomaly_map(node, array, threshold) -> None:
    """The heat colour map over the input: voxels below half the detection threshold stay uncoloured,
    so that only what is (nearly) anomalous is painted, not the whole image."""
    display = node.GetDisplayNode()
    if display is None:
        return
    if node.GetScene().GetNodeByID(ANOMALY_MAP_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(ANOMALY_MAP_COLOR_NODE_ID)
    top = max(float(np.max(array)), 1e-6)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    lower = 0.5 * threshold if threshold is not None and 0 < threshold < float("inf") else 0.0
    display.AutoThresholdOff()
    display.SetApplyThreshold(1)
    display.SetThreshold(max(lower, MAP_DISPLAY_FLOOR), max(top, lower, MAP_DISPLAY_FLOOR))


def _output_name(scene, node, wanted: str) -> str:
    """``wanted``, unless another node has that name: then the node keeps its own name if it is already
    a variant of ``wanted`` (a name is never shared by two nodes), else it gets a new unique one."""
    taken = [n for n in _nodes_named(scene, wanted) if n is not node]
    if not taken:
        return wanted
    if node.GetName().startswith(wanted) and len(_nodes_named(scene, node.GetName())) == 1:
        return node.GetName()
    return scene.GenerateUniqueName(wanted)


def _nodes_named(scene, name) -> list:
    nodes = scene.GetNodesByName(name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def write_outputs(input_node, result, reuse: Optional[OutputNodes] = None) -> OutputNodes:
    """Create (or overwrite ``reuse``) the output nodes; on failure remove whatever was created.
    A reused uncertainty map that this run does not produce (no ensemble) is removed: it would not match."""
    scene = input_node.GetScene()
    _check_result_shapes(result, array_shape(input_node))
    name = input_node.GetName()
    created = []

    def node_for(existing, class_name, suffix):
        wanted = f"{name} {suffix}"
        if existing is not None:
            existing.SetName(_output_name(scene, existing, wanted))
            return existing
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(wanted))
        created.append(node)
        return node

    stale = reuse.uncertainty if reuse is not None and result.uncertainty is None else None
    try:
        outputs = OutputNodes(
            node_for(reuse and reuse.segmentation, "vtkMRMLSegmentationNode", "anomalies"),
            node_for(reuse and reuse.counterfactual, "vtkMRMLScalarVolumeNode", "counterfactual"),
            node_for(reuse and reuse.anomaly_map, "vtkMRMLScalarVolumeNode", "anomaly map"),
            result.report, input_node=input_node)
        _write_segmentation(outputs.segmentation, result.segmentation, input_node)
        _write_scalar_volume(outputs.counterfactual, result.counterfactual, input_node)
        _display_like_input(outputs.counterfactual, input_node)
        _write_scalar_volume(outputs.anomaly_map, result.anomaly_map, input_node)
        _display_anomaly_map(outputs.anomaly_map, result.anomaly_map, (result.report or {}).get("threshold"))
        if result.uncertainty is not None:
            outputs.uncertainty = node_for(reuse and reuse.uncertainty, "vtkMRMLScalarVolumeNode", "uncertainty")
            _write_scalar_volume(outputs.uncertainty, result.uncertainty, input_node)
        for kind in ("segmentation", "counterfactual", "anomaly_map", "uncertainty"):
            node = getattr(outputs, kind)
            if node is not None:
                node.SetAttribute(INPUT_ATTRIBUTE, input_node.GetID())
                node.SetAttribute(OUTPUT_ATTRIBUTE, kind)
                place_beside(node, input_node)
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        raise
    if stale is not None and stale.GetScene() is scene:
        scene.RemoveNode(stale)
    return outputs


def _slice_nodes(scene, class_name, layout_name):
    for index in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(index, class_name)
        if node.GetLayoutName() == layout_name:
            return node
    return None


def shown_in_layout(scene, views=("Red", "Yellow")) -> bool:
    """Whether the current layout shows all these slice views. Views stay in the scene after a layout
    change (the view factory keeps them), so their presence says nothing: their mapped flag does."""
    nodes = [_slice_nodes(scene, "vtkMRMLSliceNode", name) for name in views]
    return all(node is not None and node.IsMappedInLayout() for node in nodes)


def show_results(outputs: OutputNodes, layout_manager=None) -> None:
    """The analysed input (with the anomaly map) and the counterfactual side by side, linked, with the
    segmentation over both. ``layout_manager`` (Slicer's) switches to the side-by-side layout only when the
    current one lacks the Red and Yellow views (a layout the user chose stays), then fits the views."""
    if layout_manager is not None and not shown_in_layout(outputs.input_node.GetScene(), ("Red", "Yellow")):
        layout_manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    show_side_by_side(outputs)
    if layout_manager is not None:
        layout_manager.resetSliceViews()


def show_side_by_side(outputs: OutputNodes, left: str = "Red", right: str = "Yellow") -> None:
    """Input (with the anomaly map over it) in the ``left`` slice view, the counterfactual in the
    ``right`` one, both with the segmentation, in the same orientation and with linked navigation.
    Views that do not exist (another layout) are skipped; the caller switches the layout first."""
    scene = outputs.input_node.GetScene()
    layers = {left: (outputs.input_node, outputs.anomaly_map), right: (outputs.counterfactual, None)}
    left_slice = _slice_nodes(scene, "vtkMRMLSliceNode", left)
    for view, (background, foreground) in layers.items():
        composite = _slice_nodes(scene, "vtkMRMLSliceCompositeNode", view)
        if composite is None:
            continue
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(0.5 if foreground is not None else 0.0)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)
        slice_node = _slice_nodes(scene, "vtkMRMLSliceNode", view)
        if slice_node is not None and left_slice is not None and slice_node is not left_slice:
            slice_node.SetOrientation(left_slice.GetOrientationString())
    display = outputs.segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2D(True)
