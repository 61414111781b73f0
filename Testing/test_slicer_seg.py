"""The segmentation as a Slicer segmentation file (.seg.nrrd), loaded by slicer-core's own segmentation storage
node: beside the outputs of an NRRD input by default, for any input with --seg-format seg.nrrd, never with
--seg-format volume."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import ok, run_detect  # noqa: E402


def load_segmentation(path: Path):
    """The file as Slicer loads it: a segmentation node read by vtkMRMLSegmentationStorageNode."""
    slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer cannot read {path}"
    return slicer, node.GetSegmentation()


def labelmap_voxels(slicer, segment) -> int:
    from vtk.util import numpy_support

    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return int(np.count_nonzero(scalars == int(segment.GetLabelValue())))


@pytest.fixture(scope="module")
def nrrd_run(phantom_case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicerseg")
    image = sitk.ReadImage(str(phantom_case["flair"]))
    image.SetOrigin((-48.0, -60.5, 12.0))
    sitk.WriteImage(image, str(folder / "case.nrrd"))
    ok(run_detect(folder / "case.nrrd", "-o", folder / "out", "--stages", "1", "-q"))
    return folder / "out"


def test_nrrd_input_gets_a_seg_nrrd_that_slicer_loads(nrrd_run):
    from synomaly.files.slicer_seg import ANOMALY_TERMINOLOGY

    path = nrrd_run / "case_anomaly_seg.seg.nrrd"
    report = json.loads((nrrd_run / "case_report.json").read_text())
    assert report["outputs"][path.name] == path.stat().st_size
    slicer, segmentation = load_segmentation(path)
    assert segmentation.GetNumberOfSegments() == 1
    segment_id = segmentation.GetSegmentIdBySegmentName("Anomaly")
    assert segment_id, "no segment named Anomaly"
    segment = segmentation.GetSegment(segment_id)
    import vtk

    terminology = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    assert str(terminology) == ANOMALY_TERMINOLOGY
    assert tuple(round(c, 3) for c in segment.GetColor()) == (1.0, 0.2, 0.2)
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(nrrd_run / "case_anomaly_seg.nrrd")))
    assert plain.sum() > 0 and labelmap_voxels(slicer, segment) == int(np.count_nonzero(plain))
    written = sitk.ReadImage(str(path))
    plain_image = sitk.ReadImage(str(nrrd_run / "case_anomaly_seg.nrrd"))
    assert written.GetOrigin() == plain_image.GetOrigin() and written.GetDirection() == plain_image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), plain)


def test_seg_format_chooses_for_any_input(phantom_case, tmp_path):
    from synomaly.commands.cli import main

    assert main(["detect", str(phantom_case["flair"]), "-o", str(tmp_path / "a"), "--model", "demo-phantom",
                 "--stages", "1", "-q", "--seg-format", "seg.nrrd"]) == 0
    slicer, segmentation = load_segmentation(tmp_path / "a" / "flair_anomaly_seg.seg.nrrd")
    assert segmentation.GetSegmentIdBySegmentName("Anomaly")
    ok(run_detect(phantom_case["flair"], "-o", tmp_path / "b", "--stages", "1", "-q"))
    assert not list((tmp_path / "b").glob("*.seg.nrrd")), "a NIfTI input gets none by default"
    ok(run_detect(phantom_case["flair"], "-o", tmp_path / "c", "--stages", "1", "-q", "--format", "nrrd",
                  "--seg-format", "volume"))
    assert not list((tmp_path / "c").glob("*.seg.nrrd"))


def test_the_file_and_the_slicer_module_code_the_segment_alike():
    """A .seg.nrrd loaded in Slicer and the module's own segment carry one terminology, so Slicer's DICOM export
    codes both as the SEG does (SCT 52988006 Lesion under 49755003)."""
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SynomalyDetection"))
    from SynomalyDetectionLib.MrmlBridge import ANOMALY_TERMINOLOGY as module_terminology

    from synomaly.files.slicer_seg import ANOMALY_TERMINOLOGY

    assert module_terminology == ANOMALY_TERMINOLOGY
    assert "SCT^49755003^" in ANOMALY_TERMINOLOGY and "SCT^52988006^Lesion" in ANOMALY_TERMINOLOGY
