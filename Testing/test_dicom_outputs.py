"""DICOM in, DICOM out, end to end on real files: a phantom MR series written as a scanner would (with patient,
study, an institution and a private tag), detected from the command line and the Python API; the SEG and the
Parametric Maps checked by dciodvfy (dicom3tools) and read back with highdicom and pydicom to the voxels of the
NRRD outputs; a folder of two series refused with their list, one taken with --series, both in a cohort."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from dicom_phantoms import (PRIVATE_CREATOR, dciodvfy, dciodvfy_errors, has_dciodvfy,  # noqa: E402
                            phantom_volume, write_mr_series)
from test_cli import assert_refused, ok, run_detect, snapshot, write_dicom_series  # noqa: E402

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """One phantom MR series (32 slices) and the headers of its files."""
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("dicom") / "flair"
    volume, geometry = phantom_volume()
    write_mr_series(volume, geometry, folder, generate_uid(), generate_uid())
    sources = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    return {"folder": folder, "sources": sources, "volume": volume}


@pytest.fixture(scope="module")
def detected(series, tmp_path_factory):
    """The series detected twice: by the command with every DICOM output, and by the Python API (SEG only)."""
    from synomaly.commands.cli import main

    out = tmp_path_factory.mktemp("detected")
    result = ok(run_detect(series["folder"], "-o", out / "cli", "--stages", "1", "-q",
                           "--dicom-outputs", "seg,map,counterfactual"))
    assert result.stderr == "", "no library message reaches the terminal"
    assert main(["detect", str(series["folder"]), "-o", str(out / "api"), "--model", "demo-phantom",
                 "--stages", "1", "-q"]) == 0
    return out


def nrrd(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_outputs_are_listed_in_the_report(detected):
    report = json.loads((detected / "cli" / "flair_report.json").read_text())
    for name in ("flair_anomaly_seg.dcm", "flair_anomaly_map.dcm", "flair_counterfactual.dcm"):
        assert report["outputs"][name] == (detected / "cli" / name).stat().st_size
    assert not list((detected / "api").glob("*_anomaly_map.dcm")), "seg only by default"
    assert (detected / "api" / "flair_anomaly_seg.dcm").is_file()


@pytest.mark.skipif(not has_dciodvfy(), reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", ["flair_anomaly_seg.dcm", "flair_anomaly_map.dcm", "flair_counterfactual.dcm"])
def test_dciodvfy_finds_no_error(detected, name):
    result = dciodvfy(detected / "cli" / name)
    assert ("Segmentation" if "seg" in name else "ParametricMap") in result.stdout + result.stderr
    assert not dciodvfy_errors(result), result.stdout + result.stderr


def test_seg_references_the_series_and_reads_back_to_the_nrrd_voxels(series, detected):
    seg = hd.seg.segread(detected / "cli" / "flair_anomaly_seg.dcm")
    first = series["sources"][0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.PatientName == first.PatientName and seg.PatientID == first.PatientID
    uids = [s.SOPInstanceUID for s in series["sources"]]
    expected = nrrd(detected / "cli" / "flair_anomaly_seg.nrrd") > 0
    assert expected.any() and not expected.all(axis=(1, 2)).any()
    # Per-frame references: every frame names its source instance; empty frames are left out.
    referenced = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for item in seg.PerFrameFunctionalGroupsSequence]
    assert set(referenced) <= set(uids)
    assert int(seg.NumberOfFrames) == int(expected.any(axis=(1, 2)).sum())
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0] > 0, expected)


def test_seg_codes_the_segment_and_names_the_algorithm(detected):
    from synomaly import __version__

    seg = hd.seg.segread(detected / "cli" / "flair_anomaly_seg.dcm")
    report = json.loads((detected / "cli" / "flair_report.json").read_text())
    description = seg.get_segment_description(1)
    assert description.segment_label == "Anomaly"
    assert description.segmented_property_category.value == "49755003"
    assert description.segmented_property_category.scheme_designator == "SCT"
    assert description.segmented_property_type.value == "52988006"
    algorithm = description.algorithm_identification[0]
    assert algorithm.AlgorithmName == "synomaly" and algorithm.AlgorithmVersion == __version__
    assert report["model"]["model_id"] in algorithm.AlgorithmParameters
    assert seg.SoftwareVersions == __version__ and seg.DeviceSerialNumber == report["model"]["model_id"]


@pytest.mark.parametrize("name", ["flair_anomaly_seg.dcm", "flair_anomaly_map.dcm", "flair_counterfactual.dcm"])
def test_nothing_else_of_the_source_is_carried_over(series, detected, name):
    ds = pydicom.dcmread(detected / "cli" / name)
    assert not [e for e in ds.iterall() if e.tag.is_private], "a private tag was carried over"
    assert PRIVATE_CREATOR not in str(ds)
    assert "InstitutionName" not in ds and "ProtocolName" not in ds
    assert ds.get("SeriesDescription", "").startswith("synomaly")


def test_dicom_outputs_are_never_inputs(series, detected, tmp_path):
    import shutil

    from synomaly.commands.cohort import find_inputs

    shutil.copytree(series["folder"], tmp_path / "tree" / "flair")
    shutil.copytree(detected / "cli", tmp_path / "tree" / "results")
    found = find_inputs([str(tmp_path / "tree")])
    assert [item.path for item in found.items] == [tmp_path / "tree" / "flair"]


def test_a_scan_without_anomaly_gives_a_valid_seg_of_empty_frames(series, tmp_path, capfd):
    from synomaly.files.dicom_outputs import save_dataset, segmentation_dataset, series_sources

    report = {"model": {"name": "demo-phantom", "model_id": "0123456789ab"},
              "engine": {"name": "synomaly", "version": "0"}, "threshold": 0.2}
    dataset = segmentation_dataset(series_sources(series["folder"]), np.zeros(series["volume"].shape, np.uint8),
                                   report)
    save_dataset(dataset, tmp_path / "empty.dcm")
    assert "omit" not in capfd.readouterr().err, "highdicom's own warning reached the terminal"
    back = hd.seg.segread(tmp_path / "empty.dcm")
    assert int(back.NumberOfFrames) == series["volume"].shape[0] and not back.pixel_array.any()
    if has_dciodvfy():
        assert not dciodvfy_errors(dciodvfy(tmp_path / "empty.dcm"))


def test_each_run_gets_new_uids(detected):
    a = pydicom.dcmread(detected / "cli" / "flair_anomaly_seg.dcm")
    b = pydicom.dcmread(detected / "api" / "flair_anomaly_seg.dcm")
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


@pytest.mark.parametrize("kind", ["anomaly_map", "counterfactual"])
def test_parametric_maps_read_back_to_the_nrrd_values(series, detected, kind):
    ds = pydicom.dcmread(detected / "cli" / f"flair_{kind}.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert ds.StudyInstanceUID == series["sources"][0].StudyInstanceUID
    referenced = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for item in ds.PerFrameFunctionalGroupsSequence]
    slice_of = {s.SOPInstanceUID: k for k, s in enumerate(series["sources"])}  # the files in slice order
    assert sorted(referenced) == sorted(slice_of), "one frame per source image"
    expected = nrrd(detected / "cli" / f"flair_{kind}.nrrd")[[slice_of[uid] for uid in referenced]]
    np.testing.assert_allclose(ds.pixel_array, expected, rtol=1e-6, atol=1e-6)


# --- several series in one folder -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("two") / "exam"
    volume, geometry = phantom_volume()
    study, frame = generate_uid(), generate_uid()
    uids = [generate_uid(), generate_uid()]
    write_mr_series(volume, geometry, folder, uids[0], study, 3, "AX FLAIR", frame)
    write_mr_series(volume[::-1].copy(), geometry, folder, uids[1], study, 7, "AX FLAIR repeat", frame)
    return folder, uids


def test_a_folder_of_two_series_is_refused_with_their_list(two_series, tmp_path):
    folder, uids = two_series
    before = snapshot(folder)
    line = assert_refused(run_detect(folder, "-o", tmp_path / "out", "-q"), "2 DICOM series", "--series",
                          uids[0], uids[1], "AX FLAIR repeat", "32 images")
    assert "series 7" in line
    assert not (tmp_path / "out").exists() and snapshot(folder) == before
    assert_refused(run_detect(folder, "-o", tmp_path / "out", "--series", "1.2.3", "-q"), "no DICOM series 1.2.3",
                   uids[1])


def test_series_takes_one_and_a_cohort_takes_each(two_series, tmp_path):
    folder, uids = two_series
    ok(run_detect(folder, "-o", tmp_path / "one", "--series", uids[1], "--stages", "1", "-q"))
    seg = pydicom.dcmread(tmp_path / "one" / "exam_anomaly_seg.dcm")
    chosen = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in folder.glob("IM07_*.dcm")}
    referenced = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for item in seg.PerFrameFunctionalGroupsSequence}
    assert referenced and referenced <= chosen
    flipped = nrrd(tmp_path / "one" / "exam_anomaly_seg.nrrd")

    ok(run_detect(folder.parent, "-o", tmp_path / "cohort", "--stages", "1", "-q"))
    with open(tmp_path / "cohort" / "summary.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["exam_series3", "exam_series7"]
    assert all(row["status"] == "done" for row in rows.values())
    # Both rows' input is the folder; each names its own series.
    assert {row["input"] for row in rows.values()} == {str(folder.resolve())}
    assert [rows["exam_series3"]["series"], rows["exam_series7"]["series"]] == uids
    reports = [json.loads((tmp_path / "cohort" / f"{name}_report.json").read_text()) for name in sorted(rows)]
    assert [r["series"] for r in reports] == uids  # the report names the series it read, as the summary does
    np.testing.assert_array_equal(nrrd(tmp_path / "cohort" / "exam_series7_anomaly_seg.nrrd"), flipped)
    assert (tmp_path / "cohort" / "exam_series3_anomaly_seg.dcm").is_file()


def test_a_series_chosen_in_a_cohort_run_is_named_in_its_summary_row(two_series, tmp_path):
    """--series with --shard: a cohort run of one input, the folder; its row says which series was read."""
    folder, uids = two_series
    ok(run_detect(folder, "-o", tmp_path / "out", "--series", uids[0], "--shard", "1/1", "--dicom-outputs", "none",
                  "--stages", "1", "-q"))
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["name"], row["input"], row["series"], row["status"]) for row in rows] == [
        ("exam", str(folder.resolve()), uids[0], "done")]


def test_bad_dicom_outputs_option_is_refused(series, tmp_path):
    assert_refused(run_detect(series["folder"], "-o", tmp_path / "out", "--dicom-outputs", "seg,mesh"),
                   "--dicom-outputs", "seg, map, counterfactual")
    assert not (tmp_path / "out").exists()


def test_a_series_without_frame_of_reference_gets_the_other_outputs(phantom_case, tmp_path):
    folder = write_dicom_series(phantom_case["flair"], tmp_path / "capture")  # secondary capture, as ITK writes it
    result = ok(run_detect(folder, "-o", tmp_path / "out", "--stages", "1", "-q"))
    assert "no DICOM outputs" in result.stderr and "Frame of Reference" in result.stderr
    assert not list((tmp_path / "out").glob("*.dcm")) and (tmp_path / "out" / "capture_anomaly_seg.nrrd").is_file()
    report = json.loads((tmp_path / "out" / "capture_report.json").read_text())
    assert any("no DICOM outputs" in w for w in report["warnings"])


def test_a_resampled_gap_gets_no_dicom_outputs(series, tmp_path):
    import shutil

    gapped = tmp_path / "gapped"
    shutil.copytree(series["folder"], gapped)
    sorted(gapped.iterdir())[10].unlink()
    result = ok(run_detect(gapped, "-o", tmp_path / "out", "--stages", "1", "-q", "--resample-slice-gaps"))
    assert "no DICOM outputs: the volume has 32 slices and the series 31 images" in result.stderr
    assert not list((tmp_path / "out").glob("*.dcm"))
